"""The browser pages: routes, language choice (pt_BR default, en), catalog, CSP and markup rules.

In-process with Flask's test client against the session Redis; no worker is needed (a 202 lookup
record is enough for `/lookups/<id>`).
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from flask_babel import force_locale, gettext

from enrich.web.pages import CONTENT_SECURITY_POLICY

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "translations" / "pt_BR" / "LC_MESSAGES" / "messages"
PLACEHOLDER = re.compile(r"\{(\w+)\}")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@pytest.fixture(scope="module", autouse=True)
def compiled_catalog():
    """The compiled catalog, as `make test` builds it (compiled here too when run without make)."""
    po, mo = CATALOG.with_suffix(".po"), CATALOG.with_suffix(".mo")
    if not mo.exists() or mo.stat().st_mtime < po.stat().st_mtime:
        with po.open("rb") as source:
            catalog = read_po(source, locale="pt_BR")
        with mo.open("wb") as target:
            write_mo(target, catalog)
    return mo


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def lookup_id(client) -> str:
    response = client.post("/api/lookups", json={"identifier": "01310-100"})
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    return response.get_json()["id"]


@pytest.fixture
def batch_id(client) -> str:
    """A batch of invalid lines only: complete when created, so no worker is needed."""
    response = client.post("/api/batches", json={"identifiers": ["123"]})
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["id"]


class PageParser(HTMLParser):
    """Collects what the markup rules care about: html lang, scripts, inline styles and handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.html_lang: str | None = None
        self.scripts: list[dict] = []
        self.stylesheets: list[str] = []
        self.violations: list[str] = []
        self._script: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "html":
            self.html_lang = attributes.get("lang")
        if tag == "style":
            self.violations.append("<style> element")
        if tag == "link" and attributes.get("rel") == "stylesheet":
            self.stylesheets.append(attributes["href"])
        for name, value in attrs:
            if name == "style":
                self.violations.append(f"style attribute on <{tag}>")
            if name.startswith("on"):
                self.violations.append(f"{name} attribute on <{tag}>")
            if value and value.strip().lower().startswith("javascript:"):
                self.violations.append(f"javascript: URL in {name} of <{tag}>")
        if tag == "script":
            self._script = {
                "src": attributes.get("src"),
                "type": attributes.get("type"),
                "id": attributes.get("id"),
                "text": "",
            }

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self._script["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script is not None:
            self.scripts.append(self._script)
            self._script = None


def parse_page(response) -> PageParser:
    parser = PageParser()
    parser.feed(response.get_data(as_text=True))
    parser.close()
    return parser


def page_strings(response) -> dict[str, str]:
    blocks = [script for script in parse_page(response).scripts if script["id"] == "i18n"]
    assert len(blocks) == 1 and blocks[0]["type"] == "application/json"
    return json.loads(blocks[0]["text"])


# -- routes and headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/status",
        "/batches",
        "/healthz",
        "/api/status",
        "/lookups/unknown",
        "/batches/unknown",
        "/api/nothing",
    ],
)
def test_every_response_carries_the_csp_and_security_headers(client, path):
    response = client.get(path)

    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (path, name)


def test_lookup_and_status_pages_render_as_html(client):
    for path in ("/", "/status"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.mimetype == "text/html"
    assert 'id="identifier"' in client.get("/").get_data(as_text=True)
    assert 'id="breakers"' in client.get("/status").get_data(as_text=True)


def test_lookup_page_renders_a_known_lookup(client, lookup_id):
    response = client.get(f"/lookups/{lookup_id}")

    assert response.status_code == 200
    assert f'data-lookup-id="{lookup_id}"' in response.get_data(as_text=True)


def test_batch_page_renders_its_drop_zone_and_a_known_batch(client, batch_id):
    empty = client.get("/batches")
    known = client.get(f"/batches/{batch_id}")

    assert empty.status_code == known.status_code == 200
    assert 'type="file"' in empty.get_data(as_text=True)
    assert "data-batch-id" not in empty.get_data(as_text=True)
    assert f'data-batch-id="{batch_id}"' in known.get_data(as_text=True)
    # Reached from every page's navigation, marked current on its own.
    assert re.search(r'<a href="/batches"[^>]*>Consulta em lote</a>', client.get("/").get_data(as_text=True))
    assert re.search(r'<a href="/batches" aria-current="page">', known.get_data(as_text=True))


@pytest.mark.parametrize("batch_path", ["/batches/no-such-batch", "/batches/" + "a" * 65])
def test_batch_page_of_an_unknown_or_overlong_id_is_an_html_404(client, batch_path):
    response = client.get(batch_path)

    assert response.status_code == 404
    assert response.mimetype == "text/html"
    body = response.get_data(as_text=True)
    assert 'id="not-found"' in body and "Lote não encontrado" in body
    assert 'href="/batches"' in body


@pytest.mark.parametrize("lookup_path", ["/lookups/no-such-lookup", "/lookups/" + "a" * 65])
def test_lookup_page_of_an_unknown_or_overlong_id_is_an_html_404(client, lookup_path):
    response = client.get(lookup_path)

    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert 'id="not-found"' in response.get_data(as_text=True)


def test_static_assets_the_pages_reference_are_served(client, lookup_id, batch_id):
    for path in ("/", "/status", f"/lookups/{lookup_id}", "/batches", f"/batches/{batch_id}"):
        page = parse_page(client.get(path))
        assets = [script["src"] for script in page.scripts if script["src"]] + page.stylesheets
        assert assets
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200, asset
            assert response.mimetype in ("text/javascript", "application/javascript", "text/css"), asset
            response.close()


# -- language -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept_language", [None, "pt-BR,pt;q=0.9,en;q=0.5", "pt-PT", "fr-FR,fr;q=0.9", "*"])
def test_pages_are_in_brazilian_portuguese_by_default(client, accept_language):
    headers = {"Accept-Language": accept_language} if accept_language else {}
    response = client.get("/", headers=headers)

    assert parse_page(response).html_lang == "pt-BR"
    assert ">Consultar</button>" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "accept_language", ["en", "en-US,en;q=0.9", "en-GB,pt-BR;q=0.5", "fr-FR,en;q=0.8,pt-BR;q=0.5"]
)
def test_pages_are_in_english_when_accept_language_prefers_it(client, accept_language):
    response = client.get("/status", headers={"Accept-Language": accept_language})

    assert parse_page(response).html_lang == "en"
    assert "<h1>Service status</h1>" in response.get_data(as_text=True)


def test_the_language_switch_sets_a_cookie_that_wins_over_accept_language(client):
    english = client.get("/?lang=en", headers={"Accept-Language": "pt-BR"})

    assert parse_page(english).html_lang == "en"
    cookie = english.headers["Set-Cookie"]
    assert cookie.startswith("lang=en;") and "Path=/" in cookie and "SameSite=Lax" in cookie
    # The cookie now outranks the browser's Accept-Language on every page.
    assert parse_page(client.get("/status", headers={"Accept-Language": "pt-BR"})).html_lang == "en"

    portuguese = client.get("/status?lang=pt_BR", headers={"Accept-Language": "en"})
    assert parse_page(portuguese).html_lang == "pt-BR"
    assert parse_page(client.get("/", headers={"Accept-Language": "en"})).html_lang == "pt-BR"


def test_an_unknown_language_in_the_switch_is_ignored(client):
    response = client.get("/?lang=de", headers={"Accept-Language": "en"})

    assert parse_page(response).html_lang == "en"
    assert "Set-Cookie" not in response.headers


def test_the_switch_links_point_at_both_languages_and_mark_the_current_one(client):
    body = client.get("/", headers={"Accept-Language": "en"}).get_data(as_text=True)

    assert re.search(r'<a id="lang-en" href="\?lang=en"[^>]*aria-current="true"', body)
    assert re.search(r'<a id="lang-pt" href="\?lang=pt_BR"(?![^>]*aria-current)[^>]*>', body)


def test_script_strings_are_portuguese_by_default_and_english_on_request(client):
    portuguese = page_strings(client.get("/"))
    english = page_strings(client.get("/", headers={"Accept-Language": "en"}))

    assert portuguese["cnpj_check_digits"] == "CNPJ inválido: dígitos verificadores não conferem"
    assert english["cnpj_check_digits"] == "Invalid CNPJ: check digits do not match"
    assert portuguese["field_razao_social"] == "Razão social"
    assert portuguese.keys() == english.keys()
    for key, text in portuguese.items():
        assert text, key
        assert set(PLACEHOLDER.findall(text)) == set(PLACEHOLDER.findall(english[key])), key


def test_the_compiled_catalog_translates(app):
    with app.test_request_context("/"):
        with force_locale("pt_BR"):
            portuguese = gettext("Look up")
        with force_locale("en"):
            english = gettext("Look up")

    assert (english, portuguese) == ("Look up", "Consultar")


def test_every_catalog_entry_is_translated_and_keeps_its_placeholders():
    with CATALOG.with_suffix(".po").open("rb") as source:
        catalog = read_po(source, locale="pt_BR")
    messages = [message for message in catalog if message.id]

    assert messages
    for message in messages:
        assert message.string, f"untranslated: {message.id!r}"
        assert not message.fuzzy, f"fuzzy: {message.id!r}"
        assert set(PLACEHOLDER.findall(message.id)) == set(PLACEHOLDER.findall(message.string)), message.id


# -- markup rules the CSP depends on ------------------------------------------------------------------


@pytest.mark.parametrize("accept_language", ["pt-BR", "en"])
def test_no_page_has_inline_script_code_inline_styles_or_event_handlers(
    client, lookup_id, batch_id, accept_language
):
    headers = {"Accept-Language": accept_language}
    paths = ("/", "/status", f"/lookups/{lookup_id}", "/lookups/unknown", "/batches", f"/batches/{batch_id}")
    for path in (*paths, "/batches/unknown"):
        page = parse_page(client.get(path, headers=headers))

        assert page.violations == [], path
        for script in page.scripts:
            if script["src"]:
                assert not script["text"].strip(), path
            else:
                assert script["type"] == "application/json", (path, script)
                json.loads(script["text"])
