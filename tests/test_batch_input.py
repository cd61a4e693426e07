"""batch_input: a batch's CSV or JSON becomes one entry per input line and its distinct identifiers."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sandbox_fixture import generated_ceps, generated_cnpjs, generated_cpfs

from enrich.batches.input import BatchRejected, InvalidLine, ValidLine, decode, parse_csv, parse_json

VALID = [*generated_cnpjs(20, seed=5), *generated_ceps(20, seed=5), *generated_cpfs(20, seed=5)]


def _shape(batch) -> list[tuple]:
    return [
        (e.line, e.identifier.type, e.identifier.value)
        if isinstance(e, ValidLine)
        else (e.line, "invalid", e.reason)
        for e in batch.lines
    ]


def test_a_spreadsheet_export_with_bom_semicolons_crlf_header_and_bad_rows_is_read_line_for_line():
    raw = (
        "\ufeffIdentifier;Type\r\n"
        "11.222.333/0001-81;cnpj\r\n"
        "\r\n"
        "01310-100;\r\n"
        "123;cpf\r\n"
        "111.444.777-35;CPF\r\n"
        "01310100;passport\r\n"
        "11222333000181\r\n"
        "01310100;cep;extra\r\n"
    ).encode()
    batch = parse_csv(decode(raw), max_rows=100)
    shape = _shape(batch)
    assert shape[:4] == [
        (2, "cnpj", "11222333000181"),
        (4, "cep", "01310100"),
        (5, "invalid", "CPF must have 11 digits, got 3"),
        (6, "cpf", "11144477735"),
    ]
    assert shape[4][:2] == (7, "invalid") and "passport" in shape[4][2]  # an unknown type, named
    assert shape[5] == (8, "cnpj", "11222333000181")
    assert shape[6] == (9, "invalid", "expected identifier[,type], got 3 columns")
    # Duplicates collapse (the masked and bare CNPJ are one); the lines keep both.
    assert [(i.type, i.value) for i in batch.unique] == [
        ("cnpj", "11222333000181"),
        ("cep", "01310100"),
        ("cpf", "11144477735"),
    ]
    assert [e.to_dict() for e in batch.invalid][0] == {
        "line": 5,
        "value": "123",
        "reason": "CPF must have 11 digits, got 3",
    }


def test_without_a_header_the_first_row_is_data_and_commas_separate():
    batch = parse_csv("01310-100,cep\n11.222.333/0001-81\n", max_rows=10)
    assert _shape(batch) == [(1, "cep", "01310100"), (2, "cnpj", "11222333000181")]


def test_a_header_that_is_not_identifier_type_is_a_bad_row_not_a_header():
    batch = parse_csv("cnpj;name\n11.222.333/0001-81\n", max_rows=10)
    assert _shape(batch)[0][:2] == (1, "invalid") and _shape(batch)[1] == (2, "cnpj", "11222333000181")


def test_quoted_fields_and_their_line_numbers_are_the_file_s_own():
    batch = parse_csv('"11.222.333/0001-81","cnpj"\n"01310-100"\n', max_rows=10)
    assert _shape(batch) == [(1, "cnpj", "11222333000181"), (2, "cep", "01310100")]


def test_more_rows_than_the_limit_reject_the_batch_and_the_limit_itself_is_fine():
    rows = "\n".join(generated_ceps(5, seed=9))
    assert len(parse_csv(rows, max_rows=5).lines) == 5
    with pytest.raises(BatchRejected, match="at most 4 rows"):
        parse_csv(rows, max_rows=4)
    with pytest.raises(BatchRejected, match="at most 1 rows"):
        parse_json(["x", "y"], max_rows=1)  # bad rows count too


def test_a_file_that_is_not_utf8_is_rejected_naming_the_byte():
    with pytest.raises(BatchRejected, match="not UTF-8 text \\(byte 4"):
        decode(b"0131\xff0-100\n")


def test_json_items_are_strings_or_objects_and_bad_items_are_reported_by_position():
    batch = parse_json(
        [
            "01310-100",
            {"identifier": "11.222.333/0001-81", "type": "cnpj"},
            42,
            {"identifier": "x", "type": 7},
            None,
        ],
        max_rows=10,
    )
    assert _shape(batch)[:2] == [(1, "cep", "01310100"), (2, "cnpj", "11222333000181")]
    assert [e.to_dict() for e in batch.invalid] == [
        {"line": 3, "value": "42", "reason": "each item must be a string or {identifier, type}"},
        {"line": 4, "value": "x", "reason": "type must be cnpj, cep or cpf"},
        {"line": 5, "value": "None", "reason": "each item must be a string or {identifier, type}"},
    ]
    with pytest.raises(BatchRejected):
        parse_json({"identifiers": "01310-100"}, max_rows=10)


@given(
    st.lists(st.sampled_from(VALID), min_size=1, max_size=40),
    st.sampled_from([",", ";"]),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
    st.booleans(),
)
def test_any_list_written_as_csv_reads_back_line_for_line(values, delimiter, newline, header, bom):
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=newline)
    if header:
        writer.writerow(["identifier", "type"])
    for value in values:
        writer.writerow([value, ""])
    text = decode((("\ufeff" if bom else "") + out.getvalue()).encode())
    batch = parse_csv(text, max_rows=len(values))
    first = 2 if header else 1
    assert [entry.line for entry in batch.lines] == list(range(first, first + len(values)))
    assert all(isinstance(entry, ValidLine) for entry in batch.lines)
    assert not any(isinstance(entry, InvalidLine) for entry in batch.lines)
    assert batch.unique == list(dict.fromkeys(entry.identifier for entry in batch.lines))  # first seen first
