"""The browser pages (lookup, bulk batch, status), their language (pt_BR or en) and the security headers."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, has_request_context, render_template, request
from flask_babel import Babel, format_decimal, format_number, get_locale, pgettext
from flask_babel import gettext as _

from enrich.lookups import MAX_LOOKUP_ID_LENGTH
from enrich.services import services

pages = Blueprint("pages", __name__)

# Locale of each supported language and its tag for <html lang>; Portuguese is the default.
LANGUAGES = {"pt_BR": "pt-BR", "en": "en"}
DEFAULT_LANGUAGE = "pt_BR"
LANGUAGE_COOKIE = "lang"
LANGUAGE_COOKIE_MAX_AGE = 365 * 86400

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _language_asked_in_url() -> str | None:
    """The language of a `?lang=` switch link, if it names a supported one."""
    value = request.args.get("lang")
    return value if value in LANGUAGES else None


def select_locale() -> str:
    """A switch link (`?lang=`) first, then the `lang` cookie, then Accept-Language; pt_BR otherwise."""
    if not has_request_context():
        return DEFAULT_LANGUAGE
    chosen = _language_asked_in_url() or request.cookies.get(LANGUAGE_COOKIE)
    if chosen in LANGUAGES:
        return chosen
    # By quality, highest first, on the primary tag: werkzeug's best_match(["pt_BR", "pt", "en"]) would
    # take an exact "pt-BR;q=0.5" over a preferred "en-GB" (exact matches beat prefix matches there).
    for value, quality in request.accept_languages:
        primary = value.replace("_", "-").split("-")[0].lower()
        if quality > 0 and primary in ("en", "pt"):
            return "en" if primary == "en" else DEFAULT_LANGUAGE
    return DEFAULT_LANGUAGE


def current_language() -> str:
    locale = get_locale()
    return str(locale) if locale is not None and str(locale) in LANGUAGES else DEFAULT_LANGUAGE


def script_strings() -> dict[str, str]:
    """Every text the page scripts show, in the request's language (embedded as a JSON data block).

    Placeholders are `{name}`; the scripts fill them in (never as HTML).
    """
    return {
        # identifier validation (the rules of identifiers.py)
        "type_cnpj": _("CNPJ"),
        "type_cep": _("CEP"),
        "type_cpf": _("CPF"),
        "type_unknown": _("Type not detected yet"),
        "detected": _("Detected: {type}"),
        "empty": _("Type a CNPJ, CEP or CPF"),
        "too_long": _("The identifier is too long ({count} characters); at most {max} are accepted"),
        "bad_character": _(
            "Character {character} at position {position} is not allowed; use letters, digits and . / -"
        ),
        "no_letters_or_digits": _("The identifier has no letters or digits"),
        "undetectable": _(
            "Could not tell the type: expected a CNPJ (14 characters), a CPF (11 digits) or a CEP (8 digits)"
        ),
        "cnpj_length": _("Invalid CNPJ: it must have 14 characters, got {count}"),
        "cnpj_check_not_digits": _("Invalid CNPJ: the check digits (the last two characters) must be digits"),
        "cnpj_all_equal": _("Invalid CNPJ: all characters are equal"),
        "cnpj_check_digits": _("Invalid CNPJ: check digits do not match"),
        "cpf_letters": _("Invalid CPF: it cannot contain letters"),
        "cpf_slash": _("Invalid CPF: it cannot contain '/' (only a CNPJ's mask has one)"),
        "cpf_length": _("Invalid CPF: it must have 11 digits, got {count}"),
        "cpf_all_equal": _("Invalid CPF: all digits are equal"),
        "cpf_check_digits": _("Invalid CPF: check digits do not match"),
        "cep_letters": _("Invalid CEP: it cannot contain letters"),
        "cep_slash": _("Invalid CEP: it cannot contain '/' (only a CNPJ's mask has one)"),
        "cep_length": _("Invalid CEP: it must have 8 digits, got {count}"),
        "cep_zero": _("Invalid CEP: 00000000 does not exist"),
        "valid": _("Valid {type}"),
        "incomplete": _("{type}: {count} of {length} characters"),
        # the lookup and its stream
        "looking_up": _("Looking up…"),
        "request_failed": _("The lookup could not be started (HTTP {status})"),
        "load_failed": _("The lookup could not be loaded (HTTP {status})"),
        "network_error": _("The service could not be reached. Check your connection and try again."),
        "lookup_expired": _("This lookup is unknown or has expired."),
        "status_queued": _("Queued"),
        "status_running": _("Running"),
        "status_partial": _("Partial result"),
        "status_complete": _("Complete"),
        "progress": _("{done} of {total} sources"),
        "stream_connecting": _("Connecting…"),
        "stream_live": _("Live"),
        "stream_reconnecting": _("Reconnecting…"),
        "stream_closed": _("Finished"),
        "stream_lost": _("Connection lost; trying again shortly"),
        "stream_error": _("The lookup failed: {message}"),
        "from_cache": _("Answered from the cache"),
        "lookup_complete": _("Lookup complete"),
        "source_update": _("{source}: {state}"),
        # source cards
        "state_pending": _("Waiting"),
        "state_running": _("Querying"),
        "state_retrying": _("Retrying (attempt {attempts})"),
        "state_ok": _("Answered"),
        "state_not_found": _("Not found"),
        "state_error": _("Error"),
        "state_stale": _("Stale copy"),
        "state_rate_limited": _("Rate-limited"),
        "state_circuit_open": _("Circuit open"),
        "badge_cached": _("Cached"),
        "badge_stale": _("Stale"),
        "badge_rate_limited": _("Rate-limited"),
        "badge_runs_at": _("Rate-limited: runs at {time}"),
        "badge_circuit_open": _("Circuit open"),
        "badge_not_found": _("Not found"),
        "badge_error": _("Error"),
        "elapsed": _("Took {time}"),
        "source_data": _("Source data"),
        "still_pending": _("Still pending: {sources}"),
        "pending_runs_at": _("{source} (runs at {time})"),
        # merged result
        "no_result": _("No source returned data for this identifier."),
        "result_pending": _("The result appears as soon as a source answers."),
        "field_cnpj": _("CNPJ"),
        "field_razao_social": _("Legal name (razão social)"),
        "field_nome_fantasia": _("Trade name (nome fantasia)"),
        "field_situacao_cadastral": _("Registration status (situação cadastral)"),
        "field_data_situacao_cadastral": _("Status since"),
        "field_data_abertura": _("Opened on"),
        "field_natureza_juridica": _("Legal nature"),
        "field_porte": _("Company size"),
        "field_capital_social": _("Share capital"),
        "field_cnae_principal": _("Main activity (CNAE)"),
        "field_cnaes_secundarios": _("Secondary activities (CNAE)"),
        "field_endereco": _("Address"),
        "field_logradouro": _("Street"),
        "field_numero": _("Number"),
        "field_complemento": _("Complement"),
        "field_bairro": _("District"),
        "field_municipio": _("City"),
        "field_uf": _("State (UF)"),
        "field_municipio_uf": _("City/State"),
        "field_cep": _("CEP"),
        "field_telefone": _("Phone"),
        "field_email": _("E-mail"),
        "field_socios": _("Partners (quadro de sócios)"),
        "field_partner_name": _("Name"),
        "field_partner_role": _("Qualification"),
        "field_ibge": _("IBGE code"),
        "field_ddd": _("Area code (DDD)"),
        "field_coordinates": _("Coordinates"),
        "field_cpf": _("CPF"),
        "field_valido": _("Valid"),
        "field_regiao_fiscal": _("Tax region"),
        "field_ufs": _("States (UF)"),
        "no_partners": _("No partners on record"),
        "yes": _("Yes"),
        "no": _("No"),
        # cross-checks
        "check_pass": _("OK"),
        "check_fail": _("Failed"),
        "check_unverified": _("Unverified"),
        "check_active": _("The company is active"),
        "check_cep_valid": _("The company's CEP exists"),
        "check_check_digits": _("The CPF's check digits"),
        "detail_cpf_check_digits_match": _("they match the number: it is a valid CPF"),
        "check_cep_matches_city": _("The CEP is in the company's city"),
        "check_sources_agree": _("Sources agree on: {field}"),
        # check details, by the check's `code` (the API's English `detail` is the fallback)
        "detail_too_few_answers": _("fewer than two sources answered this field"),
        "detail_sources_agree": _("{count} sources agree"),
        "detail_sources_disagree": _("sources disagree: {values}"),
        "detail_no_company": _("no source returned the company"),
        "detail_situacao_is": _("situação cadastral is {situacao}"),
        "detail_no_cep": _("the company has no CEP on record"),
        "detail_cep_not_found": _("CEP {cep} was not found"),
        "detail_cep_unchecked": _("CEP {cep} could not be checked ({reason})"),
        "detail_cep_exists": _("CEP {cep} exists"),
        "detail_cep_city": _("CEP {cep} is in {cep_city}; the company's address says {company_city}"),
        "no_checks": _("No cross-checks for this type of identifier."),
        "checks_pending": _("Cross-checks run when every source has answered."),
        # share link and recent lookups
        "link_copied": _("Link copied"),
        "copy_failed": _("Could not copy; select the link and copy it"),
        "recent_empty": _("No lookups in this browser yet."),
        "look_up_again": _("Look up {identifier} again"),
        # status page
        "breaker_closed": _("Closed"),
        "breaker_open": _("Open"),
        "breaker_half-open": _("Half-open"),
        "half_open_in": _("probe in {seconds} s"),
        "half_open_due": _("probe due"),
        "tokens": _("{tokens} of {burst}"),
        "per_minute": _("{rate}/min"),
        "no_workers": _("No live worker"),
        "never": _("Never"),
        "no_reads_yet": _("no reads yet"),
        "cache_hits": _("Hits"),
        "cache_misses": _("Misses"),
        "cache_stale": _("Stale copies served"),
        "cache_keys": _("Keys"),
        "cache_generation": _("Generation"),
        "cache_memory": _("Redis memory"),
        "healthy": _("Healthy"),
        "problems": _("Problems: {problems}"),
        "removed": _("Removed: {items}"),
        "updated_at": _("Updated at {time}"),
        "status_unreachable": _("Status unavailable ({reason}); trying again"),
        "ago": _("{time} ({seconds} s ago)"),
        # status page charts (status_charts.js)
        "chart_latest": _("{chart}: now {value}"),
        "chart_no_data": _("{chart}: no data yet"),
        "chart_breakers": _("{chart}: {states}"),
        "breaker_now": _("{source} {state}"),
        "breaker_none": _("no sample"),
        "per_second": _("{value}/s"),
        "minutes_ago": _("{minutes} min ago"),
        "now": _("now"),
        "charts_updated": _("Charts updated at {time}"),
        "charts_unreachable": _("Charts unavailable ({reason}); trying again"),
        # bulk batch page (batch.js)
        "batch_uploading": _("Uploading {name}…"),
        "batch_upload_failed": _("The batch could not be started (HTTP {status})"),
        "batch_too_big": _("The file is too big ({size}); at most {max} are accepted"),
        "batch_one_file": _("Drop one file at a time"),
        "batch_started": _("Batch started: {total} to look up"),
        "batch_load_failed": _("The batch could not be loaded (HTTP {status})"),
        "batch_expired": _("This batch is unknown or has expired."),
        "batch_status_running": _("Running"),
        "batch_status_complete": pgettext("batch status", "Complete"),
        "batch_status_cancelled": pgettext("batch status", "Cancelled"),
        "batch_status_cancelling": _("Cancelling…"),
        "batch_progress": _("{done} of {total} ({percent})"),
        "batch_finished": _("Batch finished ({status}): {done} of {total}"),
        "batch_started_at": _("started at {time}"),
        "batch_cancel_confirm": _(
            "Cancel this batch? The identifiers not started yet will not be looked up; "
            "those in progress finish. The results so far stay available."
        ),
        "batch_cancel_failed": _("The batch could not be cancelled (HTTP {status})"),
        "batch_cancel_forbidden": _("Only the browser that started this batch can cancel it."),
        "eta_estimating": _("Estimating…"),
        "eta_finished": _("Finished"),
        "eta_cancelling": _("Finishing the identifiers in progress"),
        "eta_few_seconds": _("a few seconds"),
        "eta_seconds": _("about {seconds} s"),
        "eta_minutes": _("about {minutes} min"),
        "eta_hours": _("about {hours} h {minutes} min"),
        "throughput_measuring": _("Measuring…"),
        "rate_limit_pace": _("the sources' rate limits allow {rate}"),
        "invalid_more": _("The first {shown} of {count} invalid lines; the results file lists every line."),
        "invalid_elsewhere": _("Invalid lines: {count}. The results file lists them (state “invalid”)."),
        # reasons of invalid lines and refused files (the API's English text is the fallback)
        "row_empty": _("The identifier is empty"),
        "row_columns": _("Expected an identifier and an optional type, got {count} columns"),
        "row_unknown_type": _("Unknown type {type}; use cnpj, cep or cpf"),
        "row_type_choice": _("The type must be cnpj, cep or cpf"),
        "too_many_rows": _("A batch holds at most {max} lines"),
        "not_utf8": _("The file is not UTF-8 text"),
        "no_identifiers": _("The file holds no identifiers"),
    }


def _render(template: str, status: int = 200, **context) -> Response:
    language = current_language()
    response = Response(
        render_template(
            template,
            html_lang=LANGUAGES[language],
            language=language,
            strings=script_strings(),
            **context,
        ),
        status=status,
        mimetype="text/html",
    )
    response.headers["Vary"] = "Accept-Language, Cookie"
    response.headers["Cache-Control"] = "no-cache"
    return response


@pages.get("/")
def index():
    """The lookup page."""
    return _render("index.html", lookup_id=None)


@pages.get("/lookups/<lookup_id>")
def lookup_page(lookup_id: str):
    """The lookup page showing one lookup (the script loads it and follows its stream)."""
    lookup = services().lookups.get(lookup_id) if len(lookup_id) <= MAX_LOOKUP_ID_LENGTH else None
    if lookup is None:
        return _render("not_found.html", status=404)
    return _render("index.html", lookup_id=lookup.id)


def _batch_page(batch_id: str | None) -> Response:
    settings = services().settings
    return _render(
        "batch.html",
        batch_id=batch_id,
        max_bytes=settings.batch_max_bytes,
        max_rows=format_number(settings.batch_max_rows),
        max_size=format_decimal(settings.batch_max_bytes / 1_048_576, "#,##0.#") + " MB",
    )


@pages.get("/batches")
def batch_page():
    """The bulk batch page: a CSV dropped or picked is posted to /api/batches, then followed."""
    return _batch_page(None)


@pages.get("/batches/<batch_id>")
def batch_view(batch_id: str):
    """The bulk batch page showing one batch (the script loads it and follows its stream)."""
    if not services().batches.exists(batch_id):
        return _render("not_found.html", status=404, kind="batch")
    return _batch_page(batch_id)


@pages.get("/status")
def status_page():
    """The operator status page (the script polls /api/status)."""
    return _render("status.html")


@pages.after_request
def remember_language(response: Response) -> Response:
    """A `?lang=` switch link sets the `lang` cookie, which then wins over Accept-Language."""
    language = _language_asked_in_url()
    if language is not None:
        response.set_cookie(
            LANGUAGE_COOKIE, language, max_age=LANGUAGE_COOKIE_MAX_AGE, path="/",
            samesite="Lax", httponly=True, secure=request.is_secure,
        )  # fmt: skip
    return response


@pages.after_app_request
def add_security_headers(response: Response) -> Response:
    """CSP and friends on every response of the app: the pages have no inline script or style."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Flask-Babel with the catalogs in translations/ (compiled by `make`), Portuguese by default."""
    app.config.setdefault("BABEL_DEFAULT_LOCALE", DEFAULT_LANGUAGE)
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", "translations")
    Babel(app, locale_selector=select_locale)
