"""Brazilian identifiers (CNPJ, CPF, CEP): validation, normalization, masking and type detection."""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_INPUT_LENGTH = 64
SEPARATORS = frozenset(".-/ ")
CNPJ_ONLY_SEPARATOR = "/"  # a CPF (111.444.777-35) or CEP (01310-100) never has one
# Trimmed from the ends only: values pasted from spreadsheets and e-mails often carry a tab or newline.
SURROUNDING_WHITESPACE = " \t\r\n"
ASCII_DIGITS = frozenset("0123456789")
ASCII_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
ALLOWED_CHARACTERS = ASCII_DIGITS | ASCII_UPPER | frozenset("abcdefghijklmnopqrstuvwxyz") | SEPARATORS

CNPJ_LENGTH, CPF_LENGTH, CEP_LENGTH = 14, 11, 8
CNPJ_FIRST_WEIGHTS = (5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)
CNPJ_SECOND_WEIGHTS = (6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)


class IdentifierType(enum.StrEnum):
    """The kinds of identifier the service looks up."""

    CNPJ = "cnpj"
    CEP = "cep"
    CPF = "cpf"


class InvalidIdentifier(Exception):
    """Raised when input cannot be a valid identifier; `message` is safe to show to the user."""

    def __init__(self, message: str, field: str = "identifier") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        """The error as a JSON-ready dict for API responses."""
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class Identifier:
    """A validated identifier; build it with `parse()` so `value` is always normalized."""

    type: IdentifierType
    value: str

    def masked(self) -> str:
        """The value in its usual printed form, e.g. 12.ABC.345/01DE-35, 111.444.777-35, 01310-100."""
        v = self.value
        if self.type is IdentifierType.CNPJ:
            return f"{v[:2]}.{v[2:5]}.{v[5:8]}/{v[8:12]}-{v[12:]}"
        if self.type is IdentifierType.CPF:
            return f"{v[:3]}.{v[3:6]}.{v[6:9]}-{v[9:]}"
        return f"{v[:5]}-{v[5:]}"

    def to_dict(self) -> dict[str, str]:
        """The identifier as a JSON-ready dict."""
        return {"type": self.type.value, "identifier": self.value, "masked": self.masked()}


def _mod11_digit(values: list[int], weights: tuple[int, ...]) -> int:
    remainder = sum(value * weight for value, weight in zip(values, weights, strict=True)) % 11
    return 0 if remainder < 2 else 11 - remainder


def cnpj_check_digits(base12: str) -> str:
    """The two check digits of a CNPJ whose first 12 characters ([0-9A-Z]) are `base12`."""
    if len(base12) != 12 or not set(base12) <= ASCII_DIGITS | ASCII_UPPER:
        raise ValueError("a CNPJ base must be 12 characters of 0-9 or A-Z")
    # The 2026 alphanumeric CNPJ values each character as its ASCII code minus 48, so digits keep their value.
    values = [ord(char) - 48 for char in base12]
    first = _mod11_digit(values, CNPJ_FIRST_WEIGHTS)
    second = _mod11_digit([*values, first], CNPJ_SECOND_WEIGHTS)
    return f"{first}{second}"


def cpf_check_digits(base9: str) -> str:
    """The two check digits of a CPF whose first 9 digits are `base9`."""
    if len(base9) != 9 or not set(base9) <= ASCII_DIGITS:
        raise ValueError("a CPF base must be 9 digits")
    values = [int(char) for char in base9]
    first = _mod11_digit(values, tuple(range(10, 1, -1)))
    second = _mod11_digit([*values, first], tuple(range(11, 1, -1)))
    return f"{first}{second}"


def _describe_character(char: str) -> str:
    # Control, format (e.g. bidi overrides) and unpaired surrogate characters are never echoed raw:
    # they would corrupt logs and UIs, so only their code point is shown.
    code_point = f"U+{ord(char):04X}"
    if char.isprintable() and not char.isspace():
        return f"{char!r} ({code_point})"
    return code_point


def _compact(raw: object) -> str:
    """Check the raw input's type, size and characters; return it without separators, uppercased."""
    if not isinstance(raw, str):
        raise InvalidIdentifier("identifier must be a string")
    if len(raw) > MAX_INPUT_LENGTH:
        raise InvalidIdentifier(
            f"identifier is too long ({len(raw)} characters); at most {MAX_INPUT_LENGTH} are accepted"
        )
    stripped = raw.strip(SURROUNDING_WHITESPACE)
    if not stripped:
        raise InvalidIdentifier("identifier is empty")
    leading = len(raw) - len(raw.lstrip(SURROUNDING_WHITESPACE))
    for index, char in enumerate(stripped, start=leading + 1):
        if char not in ALLOWED_CHARACTERS:
            raise InvalidIdentifier(
                f"character {_describe_character(char)} at position {index} is not allowed; "
                "use ASCII letters, digits and . / -"
            )
    compact = "".join(char for char in stripped if char not in SEPARATORS).upper()
    if not compact:
        raise InvalidIdentifier("identifier has no letters or digits")
    return compact


def _resolve_type(identifier_type: object) -> IdentifierType | None:
    if identifier_type is None or isinstance(identifier_type, IdentifierType):
        return identifier_type
    if not isinstance(identifier_type, str):
        raise InvalidIdentifier("type must be a string: cnpj, cep or cpf", field="type")
    name = identifier_type.strip().lower()
    if not name:  # an empty form field or ?type= means "detect it"
        return None
    try:
        return IdentifierType(name)
    except ValueError:
        shown = repr(identifier_type[:20]) + ("..." if len(identifier_type) > 20 else "")
        raise InvalidIdentifier(
            f"unknown identifier type {shown}; use cnpj, cep or cpf", field="type"
        ) from None


def _has_letters(compact: str) -> bool:
    return not set(compact) <= ASCII_DIGITS


def _detect_complete(compact: str, raw: str) -> IdentifierType:
    # A "/" belongs to a CNPJ's mask alone (12.345.678/0001-95): whatever its length, it is one.
    if len(compact) == CNPJ_LENGTH or CNPJ_ONLY_SEPARATOR in raw:
        return IdentifierType.CNPJ
    if not _has_letters(compact):
        if len(compact) == CPF_LENGTH:
            return IdentifierType.CPF
        if len(compact) == CEP_LENGTH:
            return IdentifierType.CEP
    raise InvalidIdentifier(
        "could not tell the identifier type: "
        "expected a CNPJ (14 characters), a CPF (11 digits) or a CEP (8 digits)"
    )


def detect_type(raw: str) -> IdentifierType | None:
    """Best guess of the type from the shape of possibly incomplete input (for the UI); None if unknown."""
    try:
        compact = _compact(raw)
    except InvalidIdentifier:
        return None
    # Letters, a "/" (only the CNPJ mask has one) or more than 11 characters can only be a CNPJ.
    if _has_letters(compact) or CNPJ_ONLY_SEPARATOR in raw or len(compact) > CPF_LENGTH:
        return IdentifierType.CNPJ if len(compact) <= CNPJ_LENGTH else None
    if len(compact) == CPF_LENGTH:
        return IdentifierType.CPF
    if len(compact) == CEP_LENGTH:
        return IdentifierType.CEP
    return None


def _validate_cnpj(compact: str) -> None:
    if len(compact) != CNPJ_LENGTH:
        raise InvalidIdentifier(f"CNPJ must have 14 characters, got {len(compact)}")
    if not set(compact[12:]) <= ASCII_DIGITS:
        raise InvalidIdentifier("CNPJ check digits (the last two characters) must be digits")
    if len(set(compact)) == 1:
        raise InvalidIdentifier("CNPJ cannot have all characters equal")
    if cnpj_check_digits(compact[:12]) != compact[12:]:
        raise InvalidIdentifier("CNPJ check digits do not match")


def _validate_cpf(compact: str) -> None:
    if _has_letters(compact):
        raise InvalidIdentifier("CPF cannot contain letters")
    if len(compact) != CPF_LENGTH:
        raise InvalidIdentifier(f"CPF must have 11 digits, got {len(compact)}")
    if len(set(compact)) == 1:
        raise InvalidIdentifier("CPF cannot have all digits equal")
    if cpf_check_digits(compact[:9]) != compact[9:]:
        raise InvalidIdentifier("CPF check digits do not match")


def _validate_cep(compact: str) -> None:
    if _has_letters(compact):
        raise InvalidIdentifier("CEP cannot contain letters")
    if len(compact) != CEP_LENGTH:
        raise InvalidIdentifier(f"CEP must have 8 digits, got {len(compact)}")
    if compact == "0" * CEP_LENGTH:
        raise InvalidIdentifier("CEP 00000000 does not exist")


_VALIDATORS = {
    IdentifierType.CNPJ: _validate_cnpj,
    IdentifierType.CPF: _validate_cpf,
    IdentifierType.CEP: _validate_cep,
}


def parse(raw: object, identifier_type: str | None = None) -> Identifier:
    """Validate and normalize `raw`, detecting its type when none is given; raises InvalidIdentifier."""
    # The type is checked first: a bad type is a malformed request whatever the identifier holds.
    wanted = _resolve_type(identifier_type)
    compact = _compact(raw)
    resolved = wanted if wanted is not None else _detect_complete(compact, raw)
    if resolved is not IdentifierType.CNPJ and CNPJ_ONLY_SEPARATOR in raw:
        name = resolved.value.upper()
        raise InvalidIdentifier(f"{name} cannot contain '/': only a CNPJ's mask has one")
    _VALIDATORS[resolved](compact)
    return Identifier(resolved, compact)
