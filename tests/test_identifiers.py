"""Tests for identifiers.py: validation, normalization, masking and type detection of CNPJ, CPF and CEP."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enrich.identifiers import (
    Identifier,
    IdentifierType,
    InvalidIdentifier,
    cnpj_check_digits,
    cpf_check_digits,
    detect_type,
    parse,
)

ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"


def mask_cnpj(value: str) -> str:
    return f"{value[:2]}.{value[2:5]}.{value[5:8]}/{value[8:12]}-{value[12:]}"


def mask_cpf(value: str) -> str:
    return f"{value[:3]}.{value[3:6]}.{value[6:9]}-{value[9:]}"


def error_of(raw: object, identifier_type: str | None = None) -> InvalidIdentifier:
    with pytest.raises(InvalidIdentifier) as caught:
        parse(raw, identifier_type)
    return caught.value


# --- known values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("11.222.333/0001-81", "11222333000181"),
        ("11222333000181", "11222333000181"),
        ("12.ABC.345/01DE-35", "12ABC34501DE35"),
        ("12.abc.345/01de-35", "12ABC34501DE35"),
        ("12ABC34501DE35", "12ABC34501DE35"),
        ("  12.aBc.345/01dE-35 \n", "12ABC34501DE35"),
    ],
)
def test_known_valid_cnpj_is_normalized_to_14_uppercase_characters(raw: str, expected: str) -> None:
    assert parse(raw) == Identifier(IdentifierType.CNPJ, expected)
    assert parse(raw, "cnpj").value == expected


def test_cnpj_check_digits_match_the_published_examples() -> None:
    assert cnpj_check_digits("112223330001") == "81"
    assert cnpj_check_digits("12ABC34501DE") == "35"
    assert cpf_check_digits("111444777") == "35"


@pytest.mark.parametrize("raw", ["11.222.333/0001-82", "12ABC34501DE36", "12.abc.345/01de-36"])
def test_cnpj_with_wrong_check_digits_is_rejected(raw: str) -> None:
    assert error_of(raw).message == "CNPJ check digits do not match"


def test_cnpj_with_letters_in_check_digits_is_rejected() -> None:
    assert "must be digits" in error_of("12ABC34501DE3A").message


@pytest.mark.parametrize("char", list(ALPHANUMERIC))
def test_cnpj_of_one_repeated_character_is_rejected(char: str) -> None:
    with pytest.raises(InvalidIdentifier):
        parse(char * 14, "cnpj")


def test_all_zero_cnpj_is_rejected_although_its_checksum_passes() -> None:
    assert cnpj_check_digits("0" * 12) == "00"
    assert error_of("00.000.000/0000-00").message == "CNPJ cannot have all characters equal"


@pytest.mark.parametrize("raw", ["111.444.777-35", "11144477735", " 111 444 777 35 "])
def test_known_valid_cpf_is_normalized_to_11_digits(raw: str) -> None:
    assert parse(raw) == Identifier(IdentifierType.CPF, "11144477735")


@pytest.mark.parametrize("digit", list(DIGITS))
def test_cpf_of_one_repeated_digit_is_rejected(digit: str) -> None:
    assert error_of(digit * 11, "cpf").message == "CPF cannot have all digits equal"


def test_cpf_with_wrong_check_digits_is_rejected() -> None:
    assert error_of("111.444.777-36").message == "CPF check digits do not match"


@pytest.mark.parametrize("raw", ["01310-100", "01310100", " 01310-100 "])
def test_cep_is_normalized_to_8_digits(raw: str) -> None:
    assert parse(raw) == Identifier(IdentifierType.CEP, "01310100")


def test_all_zero_cep_is_rejected() -> None:
    assert "does not exist" in error_of("00000-000").message


def test_masked_and_to_dict_use_the_usual_printed_forms() -> None:
    assert parse("12abc34501de35").masked() == "12.ABC.345/01DE-35"
    assert parse("11144477735").masked() == "111.444.777-35"
    assert parse("01310100").to_dict() == {"type": "cep", "identifier": "01310100", "masked": "01310-100"}


# --- rejected input -----------------------------------------------------------------------------


def test_full_width_digit_is_rejected_naming_the_character_and_position() -> None:
    error = error_of("11１.222.333/0001-81")
    assert error.field == "identifier"
    assert error.message == (
        "character '１' (U+FF11) at position 3 is not allowed; use ASCII letters, digits and . / -"
    )


def test_position_counts_from_the_start_of_the_input_including_leading_spaces() -> None:
    assert "at position 4" in error_of("  1<").message


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("112223<30001", "'<' (U+003C)"),
        ("11222'330001", '"\'" (U+0027)'),
        ("é1222333000181", "'é' (U+00E9)"),
        ("1122233300018\u0661", "'\u0661' (U+0661)"),  # Arabic-Indic digit one: a digit, but not ASCII
        ("11222\u00a0333000181", "U+00A0"),
    ],
)
def test_non_ascii_or_punctuation_characters_are_named_in_the_message(raw: str, shown: str) -> None:
    assert f"character {shown} at position" in error_of(raw).message


@pytest.mark.parametrize("control", ["\x00", "\x1b", "\x7f", "\t", "\u202e", "\ud800"])
def test_control_characters_are_rejected_without_being_echoed(control: str) -> None:
    message = error_of(f"11222{control}333000181").message
    assert f"U+{ord(control):04X} at position 6" in message
    assert control not in message


@pytest.mark.parametrize(
    "raw", [11222333000181, None, ["11222333000181"], {"cnpj": "1"}, b"11222333000181", 1.5]
)
def test_non_string_input_is_rejected(raw: object) -> None:
    error = error_of(raw)
    assert (error.message, error.field) == ("identifier must be a string", "identifier")


@pytest.mark.parametrize("raw", ["", "   ", "\n\t"])
def test_blank_input_is_reported_as_empty(raw: str) -> None:
    assert error_of(raw).message == "identifier is empty"


def test_input_of_only_separators_is_rejected() -> None:
    assert error_of(" ./- ").message == "identifier has no letters or digits"


def test_input_longer_than_64_characters_is_rejected_without_echoing_it() -> None:
    raw = "1" * 40 + "X" * 40
    message = error_of(raw).message
    assert "too long" in message and "64" in message
    assert "XXXX" not in message
    assert parse(" " * 50 + "01310-100").value == "01310100"


# --- type detection and explicit types ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("11.222.333/0001-81", IdentifierType.CNPJ),
        ("12ABC34501DE35", IdentifierType.CNPJ),
        ("111.444.777-35", IdentifierType.CPF),
        ("01310-100", IdentifierType.CEP),
    ],
)
def test_type_is_detected_from_the_shape(raw: str, expected: IdentifierType) -> None:
    assert detect_type(raw) is expected
    assert parse(raw).type is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12.AB", IdentifierType.CNPJ),
        ("11.222.333/", IdentifierType.CNPJ),
        ("112223330001", IdentifierType.CNPJ),
        ("1122", None),
        ("", None),
        ("11１", None),
        (42, None),
        ("1" * 15, None),
    ],
)
def test_detect_type_guesses_on_incomplete_input_and_never_raises(raw: object, expected: object) -> None:
    assert detect_type(raw) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["1234567", "1122233300", "112223330001", "12ABC345678", "ABCDEFGH"])
def test_undetectable_length_asks_for_one_of_the_three_shapes(raw: str) -> None:
    assert error_of(raw).message.startswith(
        "could not tell the identifier type: expected a CNPJ (14 characters)"
    )


@pytest.mark.parametrize("name", ["CNPJ", " Cnpj ", IdentifierType.CNPJ, ""])
def test_type_name_is_case_insensitive_and_blank_means_detect(name: str) -> None:
    assert parse("11222333000181", name).type is IdentifierType.CNPJ


@pytest.mark.parametrize("name", ["rg", "cnpj2", "x" * 500, "\x00", 3])
def test_unknown_type_is_rejected_on_the_type_field(name: object) -> None:
    error = error_of("11222333000181", name)  # type: ignore[arg-type]
    assert error.field == "type"
    assert "\x00" not in error.message and len(error.message) < 100


@pytest.mark.parametrize(
    ("raw", "identifier_type", "message"),
    [
        ("1114447773", "cpf", "CPF must have 11 digits, got 10"),
        ("111444777AB", "cpf", "CPF cannot contain letters"),
        ("11144477735", "cnpj", "CNPJ must have 14 characters, got 11"),
        ("0131010", "cep", "CEP must have 8 digits, got 7"),
        ("01310A00", "cep", "CEP cannot contain letters"),
        ("01310100", "cpf", "CPF must have 11 digits, got 8"),
    ],
)
def test_explicit_type_reports_why_the_value_does_not_fit(
    raw: str, identifier_type: str, message: str
) -> None:
    error = error_of(raw, identifier_type)
    assert (error.message, error.field) == (message, "identifier")


def test_invalid_identifier_to_dict_carries_message_and_field() -> None:
    assert InvalidIdentifier("bad", field="type").to_dict() == {"error": "bad", "field": "type"}


# --- properties ---------------------------------------------------------------------------------

numeric_cnpj_bases = st.text(alphabet=DIGITS, min_size=12, max_size=12)
alphanumeric_cnpj_bases = st.text(alphabet=ALPHANUMERIC, min_size=12, max_size=12)
valid_cnpjs = (
    st.one_of(numeric_cnpj_bases, alphanumeric_cnpj_bases)
    .map(lambda base: base + cnpj_check_digits(base))
    .filter(lambda value: len(set(value)) > 1)
)
valid_cpfs = (
    st.text(alphabet=DIGITS, min_size=9, max_size=9)
    .map(lambda base: base + cpf_check_digits(base))
    .filter(lambda value: len(set(value)) > 1)
)
valid_ceps = st.text(alphabet=DIGITS, min_size=8, max_size=8).filter(lambda value: value != "00000000")

FAST = settings(max_examples=150, deadline=None)


@FAST
@given(valid_cnpjs, st.booleans())
def test_generated_cnpj_round_trips_through_bare_and_masked_forms(value: str, lowercase: bool) -> None:
    bare = value.lower() if lowercase else value
    parsed = parse(bare)
    assert (
        parsed
        == parse(mask_cnpj(bare))
        == parse(f"  {bare} ", "cnpj")
        == Identifier(IdentifierType.CNPJ, value)
    )
    assert parse(parsed.masked()) == parsed


@FAST
@given(valid_cpfs)
def test_generated_cpf_round_trips_through_bare_and_masked_forms(value: str) -> None:
    parsed = parse(value)
    assert parsed == parse(mask_cpf(value)) == parse(value, "CPF") == Identifier(IdentifierType.CPF, value)
    assert parse(parsed.masked()) == parsed


@FAST
@given(valid_ceps)
def test_generated_cep_round_trips_through_bare_and_masked_forms(value: str) -> None:
    parsed = parse(value)
    assert parsed == parse(f"{value[:5]}-{value[5:]}") == Identifier(IdentifierType.CEP, value)
    assert parse(parsed.masked()) == parsed


@FAST
@given(valid_cnpjs, st.sampled_from([12, 13]), st.integers(min_value=1, max_value=9))
def test_changing_a_cnpj_check_digit_is_rejected(value: str, position: int, shift: int) -> None:
    changed_digit = str((int(value[position]) + shift) % 10)
    tampered = value[:position] + changed_digit + value[position + 1 :]
    with pytest.raises(InvalidIdentifier):
        parse(mask_cnpj(tampered))


@FAST
@given(valid_cpfs, st.sampled_from([9, 10]), st.integers(min_value=1, max_value=9))
def test_changing_a_cpf_check_digit_is_rejected(value: str, position: int, shift: int) -> None:
    changed_digit = str((int(value[position]) + shift) % 10)
    tampered = value[:position] + changed_digit + value[position + 1 :]
    with pytest.raises(InvalidIdentifier):
        parse(tampered)


@pytest.mark.parametrize("raw", ["111.444.777/35", "11.144.477/7-35", "01310/100", "0131/0100"])
def test_a_slash_makes_any_input_a_cnpj_for_parsing_and_detection_alike(raw: str) -> None:
    # Only a CNPJ's mask has a "/": the page's detection always said CNPJ, and parsing now agrees.
    assert detect_type(raw) is IdentifierType.CNPJ
    with pytest.raises(InvalidIdentifier, match="CNPJ must have 14 characters"):
        parse(raw)


@pytest.mark.parametrize(("raw", "kind"), [("111.444.777/35", "cpf"), ("01310/100", "cep")])
def test_a_cpf_or_cep_of_an_explicit_type_refuses_a_slash(raw: str, kind: str) -> None:
    with pytest.raises(InvalidIdentifier, match=f"{kind.upper()} cannot contain '/'"):
        parse(raw, kind)
    assert parse(raw.replace("/", "-"), kind).type is IdentifierType(kind)


def _python_outcome(raw: str, kind: str | None) -> list:
    try:
        identifier = parse(raw, kind)
    except InvalidIdentifier:
        return ["invalid"]
    return [identifier.type.value, identifier.value]


def test_the_pages_rules_agree_with_the_servers_on_thousands_of_inputs(page) -> None:
    # The page validates as you type with static/identifiers.js, a port of this module: run both.
    import random

    from conftest import ROOT

    generator = random.Random(1415)
    alphabet = "0123456789" * 4 + "./- " + "aAbZ"
    inputs = ["111.444.777-35", "11.222.333/0001-81", "12.ABC.345/01DE-35", "01310-100", "01.310-100"]
    inputs += [
        "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 19))) for _ in range(4000)
    ]
    for valid in ("11144477735", "11222333000181", "01310100"):  # valid ones, separators sprinkled in
        for _ in range(300):
            chars = list(valid)
            for _ in range(generator.randint(0, 4)):
                chars.insert(generator.randint(0, len(chars)), generator.choice("./- "))
            inputs.append("".join(chars))
    page.set_content("<!doctype html><html><body></body></html>")
    page.add_script_tag(path=str(ROOT / "static" / "identifiers.js"))
    kinds = [None, "cnpj", "cpf", "cep"]
    page_outcomes = page.evaluate(
        """([inputs, kinds]) => inputs.map((raw) => [Identifiers.detectType(raw), ...kinds.map((kind) => {
            try { const parsed = Identifiers.parse(raw, kind); return [parsed.type, parsed.value]; }
            catch (error) { if (error instanceof Identifiers.InvalidIdentifier) return ["invalid"]; throw error; }
        })])""",
        [inputs, kinds],
    )
    differences = []
    for raw, (detected, *outcomes) in zip(inputs, page_outcomes, strict=True):
        python = [(detect_type(raw).value if detect_type(raw) else None)] + [
            _python_outcome(raw, k) for k in kinds
        ]
        if [detected, *outcomes] != python:
            differences.append((raw, [detected, *outcomes], python))
        elif (
            python[1] != ["invalid"] and python[1][0] != python[0]
        ):  # parsed as one type, detected as another
            differences.append((raw, "detection", python))
    assert differences == [], differences[:5]
