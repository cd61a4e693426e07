"""External sources: the source interface, one adapter per upstream API, normalized schemas."""

from __future__ import annotations

import math
import os
import re
import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import DecodeError, HTTPError, ProtocolError, ReadTimeoutError

from identifiers import Identifier
from settings import SOURCE_NAMES, Settings, SourceSettings


class SourceError(Exception):
    """Base of every error a source call can raise; `reason` is a short machine word."""

    reason = "error"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class NotFound(SourceError):
    """The upstream says the identifier does not exist. Final; never counts against a breaker."""

    reason = "not_found"


class UpstreamRejected(SourceError):
    """A 4xx other than 404/429 (the upstream refuses this identifier). Final; not a breaker failure."""

    reason = "rejected"


class TransientError(SourceError):
    """Timeouts, connection errors, 5xx, garbage bodies: retried with backoff, counted by breakers."""

    reason = "transient"


class RateLimited(TransientError):
    """HTTP 429 from the upstream; `retry_after` seconds when it said so."""

    reason = "rate_limited"

    def __init__(self, message: str, status: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class BadResponse(TransientError):
    """The upstream answered with a body that is not what its API documents (HTML, bad JSON, wrong types)."""

    reason = "bad_response"


# ---------------------------------------------------------------------------------------------------------
# Normalized schemas: every source of a type returns exactly these keys (None where it has no value).

CNPJ_KEYS = (
    "cnpj", "razao_social", "nome_fantasia", "situacao_cadastral", "data_situacao_cadastral", "data_abertura",
    "natureza_juridica", "porte", "capital_social", "cnae_principal", "cnaes_secundarios", "endereco",
    "telefone", "email", "socios",
)  # fmt: skip
ADDRESS_KEYS = ("logradouro", "numero", "complemento", "bairro", "municipio", "uf", "cep")
CNAE_KEYS = ("codigo", "descricao")
PARTNER_KEYS = ("nome", "qualificacao")
CEP_KEYS = (
    "cep", "logradouro", "complemento", "bairro", "municipio", "uf", "ibge", "ddd", "latitude", "longitude",
)  # fmt: skip
CPF_KEYS = ("cpf", "valido", "regiao_fiscal", "ufs")
SCHEMA_KEYS = {"cnpj": CNPJ_KEYS, "cep": CEP_KEYS, "cpf": CPF_KEYS}

# A lookup answer is a few KB; anything past this is a broken or hostile upstream, not data.
MAX_BODY_BYTES = 2 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
USER_AGENT = "enrichment-lookup/0.1 (+https://github.com/enrichment-lookup; python-requests)"

_session: requests.Session | None = None
_session_pid: int | None = None
_session_lock = threading.Lock()


def default_session() -> requests.Session:
    """The process's shared HTTP session (keep-alive connection reuse), with the service's User-Agent."""
    global _session, _session_pid
    with _session_lock:
        # A pool inherited through fork() would share sockets with the parent, so each process builds its own.
        if _session is None or _session_pid != os.getpid():
            session = requests.Session()
            session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
            adapter = HTTPAdapter(pool_connections=len(SOURCE_NAMES), pool_maxsize=32)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _session, _session_pid = session, os.getpid()
        return _session


# ---------------------------------------------------------------------------------------------------------
# Reading upstream JSON defensively


_JSON_TYPES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _snippet(body: bytes, limit: int = 80) -> str:
    text = " ".join(body[: limit * 4].decode("utf-8", errors="replace").split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _decode_json(source: str, body: bytes) -> Any:
    body = body.removeprefix(b"\xef\xbb\xbf")  # some servers prepend a UTF-8 BOM
    stripped = body.strip()
    if not stripped:
        raise BadResponse(f"{source}: empty body where a JSON object was expected")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if stripped[:1] == b"<":
            raise BadResponse(f"{source}: answered HTML instead of JSON: {_snippet(stripped)}") from None
        if str(error).startswith("unexpected end of data"):
            raise BadResponse(
                f"{source}: JSON body is truncated (ends after {len(body)} bytes): {_snippet(stripped)}"
            ) from None
        raise BadResponse(f"{source}: body is not valid JSON ({error}): {_snippet(stripped)}") from None


def _json_object(source: str, body: bytes) -> dict[str, Any]:
    data = _decode_json(source, body)
    if not isinstance(data, dict):
        raise BadResponse(f"{source}: expected a JSON object, got {_json_type(data)}")
    return data


def _error_detail(body: bytes) -> str:
    """The upstream's own words about an error status, for the exception message."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        stripped = body.strip()
        if not stripped:
            return ""
        kind = "HTML page " if stripped[:1] == b"<" else ""
        return f": {kind}{_snippet(stripped)}"
    if isinstance(data, dict):
        message = next(
            (
                data[key]
                for key in ("message", "error", "detalhes", "titulo")
                if isinstance(data.get(key), str)
            ),
            None,
        )
        kind = data.get("type")
        parts = [part for part in (kind if isinstance(kind, str) else None, message) if part]
        if parts:
            return ": " + ": ".join(parts)[:200]
    return f": {_snippet(body)}"


_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ].*)?$")
_BRAZILIAN_DATE = re.compile(r"^(\d{2})/(\d{2})/(\d{4})$")


class _Reader:
    """Typed access to one upstream JSON object; a value of the wrong type raises BadResponse naming it."""

    def __init__(self, source: str, data: Mapping[str, Any], where: str = "") -> None:
        self.source = source
        self.data = data
        self.where = where

    def _fail(self, key: str, expected: str, value: Any) -> BadResponse:
        shown = repr(value) if isinstance(value, (str, int, float)) else _json_type(value)
        return BadResponse(f"{self.source}: field '{self.where}{key}' should be {expected}, got {shown}")

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def _text(self, key: str, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self._fail(key, "text", value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 9430800.0 is a code, not a fraction
        return str(value).strip() or None

    def text(self, key: str) -> str | None:
        """A string field, stripped; numbers become their text; empty means None."""
        return self._text(key, self.data.get(key))

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._fail(key, "true or false", value)

    def integer(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise self._fail(key, "an integer", value)

    def money(self, key: str) -> float | None:
        """An amount given as a number, "6983568523.86" or "1.000,50"."""
        value = self.data.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            amount = float(value)
        elif isinstance(value, str):
            text = value.strip().removeprefix("R$").strip()
            if "," in text:  # Brazilian notation: dots group thousands, the comma is the decimal point
                text = text.replace(".", "").replace(",", ".")
            try:
                amount = float(text)
            except ValueError:
                raise self._fail(key, "an amount", value) from None
        else:
            raise self._fail(key, "an amount", value)
        if not math.isfinite(amount):
            raise self._fail(key, "a finite amount", value)
        return amount

    def date(self, key: str) -> str | None:
        """A date as ISO yyyy-mm-dd, from yyyy-mm-dd[Thh:mm...] or dd/mm/yyyy."""
        text = self.text(key)
        if text is None:
            return None
        iso = _ISO_DATE.match(text)
        brazilian = _BRAZILIAN_DATE.match(text)
        try:
            if iso:
                return date(int(iso[1]), int(iso[2]), int(iso[3])).isoformat()
            if brazilian:
                return date(int(brazilian[3]), int(brazilian[2]), int(brazilian[1])).isoformat()
        except ValueError:
            pass
        raise self._fail(key, "a date (yyyy-mm-dd or dd/mm/yyyy)", text)

    def object(self, key: str) -> _Reader | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return _Reader(self.source, value, f"{self.where}{key}.")

    def objects(self, key: str) -> list[_Reader]:
        """A list of objects; a missing list is empty."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._fail(key, "a list", value)
        readers = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self._fail(f"{key}[{index}]", "an object", item)
            readers.append(_Reader(self.source, item, f"{self.where}{key}[{index}]."))
        return readers

    def texts(self, key: str) -> list[str]:
        """A list of strings (or numbers); a missing list is empty."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._fail(key, "a list", value)
        texts = (self._text(f"{key}[{index}]", item) for index, item in enumerate(value))
        return [text for text in texts if text]


# ---------------------------------------------------------------------------------------------------------
# Value normalizers shared by the adapters


def _fold(text: str) -> str:
    """Lower case without accents, for matching upstream wording."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()


def _alphanumeric(value: str | None) -> str:
    return re.sub(r"[^0-9A-Za-z]", "", value or "").upper()


def _digits(value: str | None) -> str:
    return re.sub(r"\D", "", value or "")


def _cep(value: str | None) -> str | None:
    digits = _digits(value)
    if not digits or set(digits) == {"0"}:
        return None
    # Numeric JSON fields lose the leading zero of CEPs in São Paulo (01xxx-xxx).
    return digits.zfill(8) if len(digits) in (7, 8) else None


def _cnae(code: str | None, description: str | None) -> dict[str, str | None] | None:
    digits = _digits(code)
    # "00.00-0-00" / 0 is how ReceitaWS and BrasilAPI say "no activity".
    if not digits or set(digits) == {"0"} or len(digits) > 7:
        return None
    description = description if description and set(description) != {"*"} else None
    return {"codigo": digits.zfill(7), "descricao": description}


def _phone(value: str | None) -> str | None:
    """The first phone number of the field, as "(DD) NNNN-NNNN"."""
    if not value:
        return None
    first = value.split("/")[0]
    digits = _digits(first)
    if len(digits) in (10, 11):
        return f"({digits[:2]}) {digits[2:-4]}-{digits[-4:]}"
    return first.strip() or None


def _email(value: str | None) -> str | None:
    return value.strip().lower() if value and "@" in value else None


def _upper(value: str | None) -> str | None:
    return value.strip().upper() if value else None


def _uf(value: str | None) -> str | None:
    value = _upper(value)
    return value if value and re.fullmatch(r"[A-Z]{2}", value) else None


def _legal_nature(value: str | None) -> str | None:
    """The text of a legal nature, without the code some upstreams put around it ("205-4 - ...", "(2054)")."""
    if not value:
        return None
    text = re.sub(r"^\d{3}-?\d\s*-\s*", "", value.strip())
    text = re.sub(r"\s*\(\d{3}-?\d\)$", "", text)
    return text or None


_COMPANY_SIZES = {
    "ME": "MICRO EMPRESA",
    "MICROEMPRESA": "MICRO EMPRESA",
    "MICRO EMPRESA": "MICRO EMPRESA",
    "EPP": "EMPRESA DE PEQUENO PORTE",
    "EMPRESA DE PEQUENO PORTE": "EMPRESA DE PEQUENO PORTE",
    "DEMAIS": "DEMAIS",
}


def _company_size(value: str | None) -> str | None:
    if not value:
        return None
    upper = value.strip().upper()
    return _COMPANY_SIZES.get(_fold(upper).upper(), upper)


def _street(kind: str | None, street: str | None) -> str | None:
    """The street with its type ("AVENIDA" + "PAULISTA 37"), so every source names the street alike."""
    if not street:
        return None
    if kind and not _fold(street).startswith(_fold(kind) + " "):
        return f"{kind.strip()} {street.strip()}"
    return street.strip()


def _qualification(value: str | None) -> str | None:
    """A partner's role without ReceitaWS's code prefix ("49-Sócio-Administrador")."""
    if not value:
        return None
    return re.sub(r"^\d+\s*-\s*", "", value).strip() or None


def _record(keys: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
    """A dict with exactly `keys`, None where `values` has nothing; a stray key is a programming error."""
    stray = set(values) - set(keys)
    if stray:
        raise KeyError(f"not in the normalized schema: {sorted(stray)}")
    return {key: values.get(key) for key in keys}


def _address(**values: Any) -> dict[str, Any]:
    address = _record(ADDRESS_KEYS, values)
    return address | {"uf": _uf(address["uf"]), "cep": _cep(address["cep"])}


def _company(**values: Any) -> dict[str, Any]:
    """One company in the normalized CNPJ schema (the same keys whatever the source)."""
    company = _record(CNPJ_KEYS, values)
    return company | {
        "situacao_cadastral": _upper(company["situacao_cadastral"]),
        "natureza_juridica": _legal_nature(company["natureza_juridica"]),
        "porte": _company_size(company["porte"]),
        "cnaes_secundarios": [cnae for cnae in company["cnaes_secundarios"] or [] if cnae],
        "endereco": company["endereco"] or _address(),
        "email": _email(company["email"]),
        "socios": [partner for partner in company["socios"] or [] if partner["nome"]],
    }


def _place(**values: Any) -> dict[str, Any]:
    """One CEP in the normalized CEP schema (the same keys whatever the source)."""
    place = _record(CEP_KEYS, values)
    ibge, ddd = _digits(place["ibge"]), _digits(place["ddd"])
    return place | {
        "uf": _uf(place["uf"]),
        "ibge": ibge if len(ibge) == 7 else None,
        "ddd": ddd if len(ddd) == 2 else None,
    }


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# ---------------------------------------------------------------------------------------------------------
# The source interface


def _label(identifier: Identifier) -> str:
    return f"{identifier.type.value.upper()} {identifier.masked()}"


@dataclass(frozen=True)
class Source:
    """One upstream API: its URL for an identifier, the HTTP call, and the mapping into the normalized schema.

    Subclasses give `_path` and `_normalize`; `_check_body` reads errors that arrive inside HTTP 200.
    """

    name: str
    types: tuple[str, ...]
    settings: SourceSettings

    def to_dict(self) -> dict[str, Any]:
        """The source as a JSON-ready dict."""
        return {
            "name": self.name,
            "types": list(self.types),
            "base_url": self.settings.base_url,
            "timeout": self.settings.timeout,
        }

    def supports(self, identifier: Identifier) -> bool:
        """Whether this upstream can look this identifier up at all."""
        return identifier.type.value in self.types

    def url(self, identifier: Identifier) -> str:
        """The absolute URL of this identifier at this upstream."""
        return self.settings.base_url.rstrip("/") + self._path(identifier)

    def fetch(self, identifier: Identifier, session: requests.Session | None = None) -> dict[str, Any]:
        """GET the identifier within the source's timeout; normalized data, or a SourceError saying why not."""
        if not self.supports(identifier):
            raise UpstreamRejected(f"{self.name} cannot look up {_label(identifier)}")
        url = self.url(identifier)
        timeout = self.settings.timeout
        http = session if session is not None else default_session()
        deadline = time.monotonic() + timeout  # for the whole exchange, not each socket read
        try:
            with http.get(url, timeout=timeout, stream=True) as response:
                body = self._read_body(response, deadline)
                status, headers = response.status_code, response.headers
        except requests.Timeout as error:
            raise TransientError(
                f"{self.name}: no answer within {timeout:g}s for {_label(identifier)}"
            ) from error
        except ReadTimeoutError as error:
            raise TransientError(
                f"{self.name}: answer for {_label(identifier)} stalled past {timeout:g}s"
            ) from error
        except (ProtocolError, DecodeError) as error:
            raise BadResponse(
                f"{self.name}: body cut off or undecodable for {_label(identifier)}: {error}"
            ) from error
        except HTTPError as error:
            raise TransientError(
                f"{self.name}: reading the answer for {_label(identifier)} failed: {error}"
            ) from error
        except requests.ConnectionError as error:
            raise TransientError(
                f"{self.name}: connection to {self.settings.base_url} failed: {error}"
            ) from error
        except requests.RequestException as error:
            raise TransientError(f"{self.name}: request for {_label(identifier)} failed: {error}") from error
        return self.parse(identifier, status, body, headers)

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadResponse(
                f"{self.name}: body of {int(declared)} bytes is over the {MAX_BODY_BYTES} byte limit "
                f"(HTTP {response.status_code})"
            )
        chunks: list[bytes] = []
        size = 0
        # read1 returns whatever has arrived, so a body that drips in slowly still meets the deadline below
        # (iter_content would block until a whole chunk came); it also decodes gzip, counted after decoding.
        while chunk := response.raw.read1(READ_CHUNK_BYTES, decode_content=True):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BadResponse(
                    f"{self.name}: body is larger than the {MAX_BODY_BYTES} byte limit "
                    f"(HTTP {response.status_code}); stopped reading"
                )
            # The requests timeout bounds each socket read, not the whole body.
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{self.name}: body took longer than {self.settings.timeout:g}s to arrive"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(
        self, identifier: Identifier, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Turn one HTTP answer into normalized data or the SourceError it means (pure, no I/O)."""
        if not self.supports(identifier):
            raise UpstreamRejected(f"{self.name} cannot look up {_label(identifier)}")
        self._check_status(identifier, status, body, headers)
        data = _json_object(self.name, body)
        self._check_body(identifier, data, status)
        return self._normalize(identifier, _Reader(self.name, data))

    def _check_status(
        self, identifier: Identifier, status: int, body: bytes, headers: Mapping[str, str] | None
    ) -> None:
        if 200 <= status < 300:
            return
        detail = _error_detail(body)
        what = f"{self.name}: {_label(identifier)}"
        if status == 429:
            retry_after = _retry_after(headers)
            when = f", retry after {retry_after:g}s" if retry_after is not None else ""
            raise RateLimited(f"{what}: rate limited (HTTP 429{detail}){when}", status, retry_after)
        if status == 404:
            raise NotFound(f"{what} not found (HTTP 404{detail})", status)
        if status == 408 or status >= 500:
            raise TransientError(f"{what}: upstream error (HTTP {status}{detail})", status)
        if 400 <= status < 500:
            raise UpstreamRejected(f"{what} rejected by the upstream (HTTP {status}{detail})", status)
        raise BadResponse(f"{what}: unexpected HTTP {status}{detail}", status)

    def _check_body(self, identifier: Identifier, data: dict[str, Any], status: int) -> None:
        """Raise the error an upstream reports inside a 2xx body; most report none there."""

    def _path(self, identifier: Identifier) -> str:
        raise NotImplementedError

    def _normalize(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        raise NotImplementedError

    def _same_identifier(self, identifier: Identifier, answered: str | None, length: int) -> str:
        """The identifier the upstream answered for, which must be the one asked (or absent)."""
        normalized = _alphanumeric(answered)
        if normalized and len(normalized) < length and normalized.isdigit():
            normalized = normalized.zfill(length)  # numeric JSON drops leading zeros
        if not normalized:
            return identifier.value
        if normalized != identifier.value:
            raise BadResponse(f"{self.name}: answered for {answered!r} when asked for {_label(identifier)}")
        return normalized


# ---------------------------------------------------------------------------------------------------------
# Adapters


class BrasilAPI(Source):
    """brasilapi.com.br: CNPJ (a minhareceita.org proxy), CEP v2 and CPF; errors as HTTP 400/404/500."""

    def _path(self, identifier: Identifier) -> str:
        prefix = {"cnpj": "/api/cnpj/v1/", "cep": "/api/cep/v2/", "cpf": "/api/cpf/v1/"}[
            identifier.type.value
        ]
        return prefix + identifier.value

    def _normalize(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        kind = identifier.type.value
        if kind == "cnpj":
            return self._company(identifier, reader)
        if kind == "cep":
            return self._place(identifier, reader)
        return self._person(identifier, reader)

    def _company(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        if reader.text("razao_social") is None:
            raise BadResponse(f"{self.name}: CNPJ body has no razao_social")
        return _company(
            cnpj=self._same_identifier(identifier, reader.text("cnpj"), 14),
            razao_social=reader.text("razao_social"),
            nome_fantasia=reader.text("nome_fantasia"),
            situacao_cadastral=reader.text("descricao_situacao_cadastral"),
            data_situacao_cadastral=reader.date("data_situacao_cadastral"),
            data_abertura=reader.date("data_inicio_atividade"),
            natureza_juridica=reader.text("natureza_juridica"),
            porte=reader.text("porte") or reader.text("descricao_porte"),
            capital_social=reader.money("capital_social"),
            cnae_principal=_cnae(reader.text("cnae_fiscal"), reader.text("cnae_fiscal_descricao")),
            cnaes_secundarios=[
                _cnae(item.text("codigo"), item.text("descricao"))
                for item in reader.objects("cnaes_secundarios")
            ],
            endereco=_address(
                logradouro=_street(reader.text("descricao_tipo_de_logradouro"), reader.text("logradouro")),
                numero=reader.text("numero"),
                complemento=reader.text("complemento"),
                bairro=reader.text("bairro"),
                municipio=reader.text("municipio"),
                uf=reader.text("uf"),
                cep=reader.text("cep"),
            ),
            telefone=_phone(reader.text("ddd_telefone_1")) or _phone(reader.text("ddd_telefone_2")),
            email=reader.text("email"),
            socios=[
                {"nome": partner.text("nome_socio"), "qualificacao": partner.text("qualificacao_socio")}
                for partner in reader.objects("qsa")
            ],
        )

    def _place(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        if reader.text("city") is None:
            raise BadResponse(f"{self.name}: CEP body has no city")
        # The IBGE code is {"city", "state"} in some answers and a bare string in others.
        ibge = reader.object("ibge") if isinstance(reader.raw("ibge"), dict) else None
        location = reader.object("location")
        coordinates = location.object("coordinates") if location else None
        return _place(
            cep=self._same_identifier(identifier, reader.text("cep"), 8),
            logradouro=reader.text("street"),
            bairro=reader.text("neighborhood"),
            municipio=reader.text("city"),
            uf=reader.text("state"),
            ibge=ibge.text("city") if ibge else reader.text("ibge"),
            latitude=coordinates.money("latitude") if coordinates else None,
            longitude=coordinates.money("longitude") if coordinates else None,
        )

    def _person(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        region = reader.integer("rf")
        if region is not None and not 0 <= region <= 9:
            raise BadResponse(f"{self.name}: field 'rf' should be a fiscal region 0-9, got {region}")
        return {
            "cpf": self._same_identifier(identifier, reader.text("cpf"), 11),
            "valido": reader.boolean("isValid"),
            "regiao_fiscal": region,
            "ufs": [uf for uf in (_uf(text) for text in reader.texts("ufs")) if uf],
        }


_RECEITAWS_REJECTED = ("invalido", "invalid")
_RECEITAWS_NOT_FOUND = (
    "nao encontrad",
    "not found",
    "rejeitado",
    "nao existe",
    "inexistente",
    "nao ha registro",
)
_RECEITAWS_RATE_LIMITED = ("too many", "muitas requisicoes", "limite")


class ReceitaWS(Source):
    """receitaws.com.br: numeric CNPJs only; errors inside HTTP 200 as {"status": "ERROR", "message"}."""

    def supports(self, identifier: Identifier) -> bool:
        """Only numeric CNPJs: ReceitaWS predates the alphanumeric CNPJ and rejects it."""
        return super().supports(identifier) and identifier.value.isdigit()

    def _path(self, identifier: Identifier) -> str:
        return f"/v1/cnpj/{identifier.value}"

    def _check_body(self, identifier: Identifier, data: dict[str, Any], status: int) -> None:
        state = data.get("status")
        if state == "OK" or (state is None and "nome" in data):
            return
        if state != "ERROR":
            raise BadResponse(
                f"{self.name}: unexpected status {state!r} in the body for {_label(identifier)}"
            )
        message = data.get("message")
        message = message.strip() if isinstance(message, str) and message.strip() else "no message"
        what = f"{self.name}: {_label(identifier)}"
        folded = _fold(message)
        if any(word in folded for word in _RECEITAWS_REJECTED):
            raise UpstreamRejected(f"{what} rejected by the upstream: {message}", status)
        if any(word in folded for word in _RECEITAWS_NOT_FOUND):
            raise NotFound(f"{what} not found: {message}", status)
        if any(word in folded for word in _RECEITAWS_RATE_LIMITED):
            raise RateLimited(f"{what}: rate limited: {message}", status)
        raise TransientError(f"{what}: upstream error: {message}", status)

    def _normalize(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        if reader.text("nome") is None:
            raise BadResponse(f"{self.name}: CNPJ body has no nome")
        main = reader.objects("atividade_principal")
        return _company(
            cnpj=self._same_identifier(identifier, reader.text("cnpj"), 14),
            razao_social=reader.text("nome"),
            nome_fantasia=reader.text("fantasia"),
            situacao_cadastral=reader.text("situacao"),
            data_situacao_cadastral=reader.date("data_situacao"),
            data_abertura=reader.date("abertura"),
            natureza_juridica=reader.text("natureza_juridica"),
            porte=reader.text("porte"),
            capital_social=reader.money("capital_social"),
            cnae_principal=_cnae(main[0].text("code"), main[0].text("text")) if main else None,
            cnaes_secundarios=[
                _cnae(item.text("code"), item.text("text"))
                for item in reader.objects("atividades_secundarias")
            ],
            endereco=_address(
                logradouro=reader.text("logradouro"),
                numero=reader.text("numero"),
                complemento=reader.text("complemento"),
                bairro=reader.text("bairro"),
                municipio=reader.text("municipio"),
                uf=reader.text("uf"),
                cep=reader.text("cep"),
            ),
            telefone=_phone(reader.text("telefone")),
            email=reader.text("email"),
            socios=[
                {"nome": partner.text("nome"), "qualificacao": _qualification(partner.text("qual"))}
                for partner in reader.objects("qsa")
            ],
        )


class OpenCNPJ(Source):
    """api.opencnpj.org: CNPJ (numeric and alphanumeric); errors as HTTP 400/404 {"error": ...}."""

    def _path(self, identifier: Identifier) -> str:
        return f"/{identifier.value}"

    def _normalize(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        if reader.text("razao_social") is None:
            raise BadResponse(f"{self.name}: CNPJ body has no razao_social")
        # Newer answers list every CNAE with its description in "cnaes"; older ones give bare codes.
        descriptions = {
            _digits(item.text("codigo")).zfill(7): item.text("descricao") for item in reader.objects("cnaes")
        }
        main_code = reader.text("cnae_principal")
        phones = [phone for phone in reader.objects("telefones") if not phone.boolean("is_fax")]
        phone = f"{phones[0].text('ddd') or ''}{phones[0].text('numero') or ''}" if phones else None
        return _company(
            cnpj=self._same_identifier(identifier, reader.text("cnpj"), 14),
            razao_social=reader.text("razao_social"),
            nome_fantasia=reader.text("nome_fantasia"),
            situacao_cadastral=reader.text("situacao_cadastral"),
            data_situacao_cadastral=reader.date("data_situacao_cadastral"),
            data_abertura=reader.date("data_inicio_atividade"),
            natureza_juridica=reader.text("natureza_juridica"),
            porte=reader.text("porte_empresa"),
            capital_social=reader.money("capital_social"),
            cnae_principal=_cnae(main_code, descriptions.get(_digits(main_code).zfill(7))),
            cnaes_secundarios=[
                _cnae(code, descriptions.get(_digits(code).zfill(7)))
                for code in reader.texts("cnaes_secundarios")
            ],
            endereco=_address(
                logradouro=_street(reader.text("tipo_logradouro"), reader.text("logradouro")),
                numero=reader.text("numero"),
                complemento=reader.text("complemento"),
                bairro=reader.text("bairro"),
                municipio=reader.text("municipio"),
                uf=reader.text("uf"),
                cep=reader.text("cep"),
            ),
            telefone=_phone(phone),
            email=reader.text("email"),
            socios=[
                {"nome": partner.text("nome_socio"), "qualificacao": partner.text("qualificacao_socio")}
                for partner in reader.objects("QSA")
            ],
        )


class ViaCEP(Source):
    """viacep.com.br: CEP; an unknown CEP is HTTP 200 with "erro": true (or "true")."""

    def _path(self, identifier: Identifier) -> str:
        return f"/ws/{identifier.value}/json/"

    def _check_body(self, identifier: Identifier, data: dict[str, Any], status: int) -> None:
        error = data.get("erro")
        if error is True or (isinstance(error, str) and error.strip().lower() == "true"):
            raise NotFound(f'{self.name}: {_label(identifier)} not found ("erro": {error!r})', status)

    def _normalize(self, identifier: Identifier, reader: _Reader) -> dict[str, Any]:
        if reader.text("localidade") is None:
            raise BadResponse(f"{self.name}: CEP body has no localidade")
        return _place(
            cep=self._same_identifier(identifier, reader.text("cep"), 8),
            logradouro=reader.text("logradouro"),
            complemento=reader.text("complemento"),
            bairro=reader.text("bairro"),
            municipio=reader.text("localidade"),
            uf=reader.text("uf"),
            ibge=reader.text("ibge"),
            ddd=reader.text("ddd"),
        )


ADAPTERS: dict[str, tuple[type[Source], tuple[str, ...]]] = {
    "brasilapi": (BrasilAPI, ("cnpj", "cep", "cpf")),
    "receitaws": (ReceitaWS, ("cnpj",)),
    "opencnpj": (OpenCNPJ, ("cnpj",)),
    "viacep": (ViaCEP, ("cep",)),
}


def build_sources(settings: Settings) -> dict[str, Source]:
    """Every known source, configured from `settings.sources`, in SOURCE_NAMES order."""
    missing = [name for name in SOURCE_NAMES if name not in settings.sources]
    if missing:
        raise ValueError(
            f"settings have no source settings for {', '.join(missing)}; use Settings.from_env()"
        )
    sources: dict[str, Source] = {}
    for name in SOURCE_NAMES:
        adapter, types = ADAPTERS[name]
        sources[name] = adapter(name=name, types=types, settings=settings.sources[name])
    return sources


def sources_for(identifier_type: str, sources: Mapping[str, Source]) -> list[Source]:
    """The sources that serve this identifier type, in SOURCE_NAMES order (check `supports` per identifier)."""
    kind = str(getattr(identifier_type, "value", identifier_type))  # an IdentifierType or its string
    ordered = sorted(
        sources, key=lambda name: SOURCE_NAMES.index(name) if name in SOURCE_NAMES else len(SOURCE_NAMES)
    )
    return [sources[name] for name in ordered if kind in sources[name].types]
