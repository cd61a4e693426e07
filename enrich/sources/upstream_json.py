"""Defensive reading of upstream JSON bodies into normalized values (typed fields, cleaned-up codes)."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from datetime import date
from typing import Any

import orjson

from enrich.sources.errors import BadResponse

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


def json_object(source: str, body: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadResponse saying what it was instead (empty, HTML, truncated, a list)."""
    data = _decode_json(source, body)
    if not isinstance(data, dict):
        raise BadResponse(f"{source}: expected a JSON object, got {_json_type(data)}")
    return data


def error_detail(body: bytes) -> str:
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


class JsonReader:
    """Typed access to one upstream JSON object; a value of the wrong type raises BadResponse naming it."""

    def __init__(self, source: str, data: Mapping[str, Any], where: str = "") -> None:
        self.source = source
        self.data = data
        self.where = where

    def _fail(self, key: str, expected: str, value: Any) -> BadResponse:
        shown = repr(value) if isinstance(value, (str, int, float)) else _json_type(value)
        return BadResponse(f"{self.source}: field '{self.where}{key}' should be {expected}, got {shown}")

    def raw(self, key: str) -> Any:
        """The value as decoded, for fields whose type varies between answers."""
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
        """A true/false field; absent or null means None."""
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._fail(key, "true or false", value)

    def integer(self, key: str) -> int | None:
        """An integer given as a number or a string of digits."""
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

    def object(self, key: str) -> JsonReader | None:
        """A nested object, read the same way; errors name its path ("location.coordinates.latitude")."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return JsonReader(self.source, value, f"{self.where}{key}.")

    def objects(self, key: str) -> list[JsonReader]:
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
            readers.append(JsonReader(self.source, item, f"{self.where}{key}[{index}]."))
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


def fold(text: str) -> str:
    """Lower case without accents, for matching upstream wording."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()


def only_alphanumeric(value: str | None) -> str:
    """The letters and digits of the value, upper case (an identifier without its mask)."""
    return re.sub(r"[^0-9A-Za-z]", "", value or "").upper()


def only_digits(value: str | None) -> str:
    """The digits of the value, without mask or punctuation."""
    return re.sub(r"\D", "", value or "")


def clean_cep(value: str | None) -> str | None:
    """The CEP as its 8 digits, or None when the field holds no usable CEP."""
    digits = only_digits(value)
    if not digits or set(digits) == {"0"}:
        return None
    # Numeric JSON fields lose the leading zero of CEPs in São Paulo (01xxx-xxx).
    return digits.zfill(8) if len(digits) in (7, 8) else None


def clean_cnae(code: str | None, description: str | None) -> dict[str, str | None] | None:
    """One activity as {"codigo": 7 digits, "descricao"}, or None for the placeholders meaning "none"."""
    digits = only_digits(code)
    # "00.00-0-00" / 0 is how ReceitaWS and BrasilAPI say "no activity".
    if not digits or set(digits) == {"0"} or len(digits) > 7:
        return None
    description = description if description and set(description) != {"*"} else None
    return {"codigo": digits.zfill(7), "descricao": description}


def clean_phone(value: str | None) -> str | None:
    """The first phone number of the field, as "(DD) NNNN-NNNN"."""
    if not value:
        return None
    first = value.split("/")[0]
    digits = only_digits(first)
    if len(digits) in (10, 11):
        return f"({digits[:2]}) {digits[2:-4]}-{digits[-4:]}"
    return first.strip() or None


def clean_email(value: str | None) -> str | None:
    """The address in lower case, or None when the field is not an email address."""
    return value.strip().lower() if value and "@" in value else None


def upper_or_none(value: str | None) -> str | None:
    """The text stripped and in upper case; empty means None."""
    return value.strip().upper() if value else None


def clean_uf(value: str | None) -> str | None:
    """A two-letter state code in upper case, or None."""
    value = upper_or_none(value)
    return value if value and re.fullmatch(r"[A-Z]{2}", value) else None


def clean_legal_nature(value: str | None) -> str | None:
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


def clean_company_size(value: str | None) -> str | None:
    """The porte in the register's words, whichever abbreviation ("ME", "EPP") the upstream used."""
    if not value:
        return None
    upper = value.strip().upper()
    return _COMPANY_SIZES.get(fold(upper).upper(), upper)


def street_with_type(kind: str | None, street: str | None) -> str | None:
    """The street with its type ("AVENIDA" + "PAULISTA 37"), so every source names the street alike."""
    if not street:
        return None
    if kind and not fold(street).startswith(fold(kind) + " "):
        return f"{kind.strip()} {street.strip()}"
    return street.strip()


def clean_qualification(value: str | None) -> str | None:
    """A partner's role without ReceitaWS's code prefix ("49-Sócio-Administrador")."""
    if not value:
        return None
    return re.sub(r"^\d+\s*-\s*", "", value).strip() or None
