"""What a batch's results rows hold: an item's summary, the main fields per type, CSV and JSONL.

An item settles into a summary (state, main fields, state per source, error, lookup id) kept in
the batch's `:items` hash; each input line's row is that summary with the line and its input.
The serializers write rows as they come, a few hundred at a time, so a 10,000-row result is
streamed by `GET /api/batches/<id>/results` and `flask batch run` without being built in memory.
The CSV is defused against formula injection (a cell a spreadsheet would run gets a leading `'`);
the JSONL keeps every value as it is: it is data for programs, not for a spreadsheet.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterator
from typing import Any

import orjson
from defusedcsv import csv as defused_csv

from enrich import cpf_answers, cross_checks
from enrich.identifiers import Identifier
from enrich.lookups import Lookup, SourceState

# The main fields of a row, by type, as the merged lookup result names them (`endereco.x`: nested).
MAIN_FIELDS = {
    "cnpj": (
        "razao_social",
        "nome_fantasia",
        "situacao_cadastral",
        "endereco.logradouro",
        "endereco.bairro",
        "endereco.municipio",
        "endereco.uf",
        "endereco.cep",
    ),
    "cep": ("logradouro", "bairro", "municipio", "uf", "cep"),
    "cpf": ("valido", "regiao_fiscal"),
}
CSV_COLUMNS = (
    "line",
    "input",
    "type",
    "identifier",
    "state",
    "razao_social",
    "nome_fantasia",
    "situacao_cadastral",
    "logradouro",
    "bairro",
    "municipio",
    "uf",
    "cep",
    "valido",
    "regiao_fiscal",
    "sources",
    "error",
    "lookup_id",
)


def _field(data: dict, path: str) -> Any:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def main_fields(kind: str, data: dict | None) -> dict[str, Any]:
    """The fields a results row shows for this type (named without their `endereco.`)."""
    if not data:
        return {}
    return {path.rsplit(".", 1)[-1]: _field(data, path) for path in MAIN_FIELDS.get(kind, ())}


def summarize(kind: str, sources: dict, data: dict | None, complete: bool, lookup_id: str | None) -> dict:
    """An item's outcome from its lookup's sources and merged data (`complete`: its lookup is).

    found: some source answered with data; not_found: the sources that answered all said "no such
    identifier"; failed: nobody answered.  Not complete (its lookup's work was lost, see `lost`):
    partial when some source answered with data, else failed.
    """
    states = {name: str(result.state) for name, result in sources.items()}
    if data:
        state = "found" if complete else "partial"
    elif complete and any(result.state == SourceState.NOT_FOUND for result in sources.values()):
        state = "not_found"
    else:
        state = "failed"
    errors = [
        f"{name}: {result.error}"
        for name, result in sources.items()
        if result.error and result.state not in (SourceState.OK, SourceState.STALE)
    ]
    error = "; ".join(errors) if state in ("failed", "partial") else None
    return {
        "state": state,
        "fields": main_fields(kind, data),
        "sources": states,
        "error": error,
        "lookup_id": lookup_id,
    }


def summary_of(lookup: Lookup, complete: bool) -> dict:
    """The summary of an item from its lookup (`complete`: it is; else what it has so far)."""
    data = (lookup.result or {}).get("data")
    if data is None and not complete:
        data = cross_checks.merge(lookup.type, lookup.sources)
    return summarize(lookup.type, lookup.sources, data, complete, lookup.id)


def lost(lookup: Lookup, idle: float) -> dict:
    """The summary of an item whose lookup's work was lost for good: none of its sources moved for
    `idle` seconds and no task of it is left anywhere (batches.runner.BatchRunner._settle_lost).

    What the settled sources answered is kept (`partial` with data, else `failed`); each source that
    never settled shows `error` with why, never the `running` or `pending` it was left in.
    """
    sources = {
        name: result
        if result.settled
        else dataclasses.replace(
            result,
            state=SourceState.ERROR,
            error=f"no answer: its call was lost ({result.state} when its work stopped)",
        )
        for name, result in lookup.sources.items()
    }
    summary = summarize(lookup.type, sources, cross_checks.merge(lookup.type, sources), False, lookup.id)
    why = f"its lookup's work was lost: nothing happened to it for {idle:.0f} s and no task of it is left to run"
    summary["error"] = "; ".join(part for part in (why, summary["error"]) if part)
    return summary


def cpf_summary(identifier: Identifier) -> dict:
    """A CPF item, settled from the number alone (cpf_answers.py): shown masked, never looked up."""
    return {
        "state": "found",
        "identifier": cpf_answers.masked(identifier.value),
        "fields": main_fields("cpf", cpf_answers.facts(identifier)),
        "sources": {},
        "error": None,
        "lookup_id": None,
    }


def failed(error: str, lookup_id: str | None = None) -> dict:
    """The summary of an item that ends without an answer or a lookup to show (its lookup expired)."""
    return {"state": "failed", "fields": {}, "sources": {}, "error": error, "lookup_id": lookup_id}


def row(
    line: int, value: str, key: str, reason: str, summary: bytes | None, in_flight: bytes | None, status: str
) -> dict:
    """One results row: an input line and, for a valid one, its item's summary or its state so far."""
    if not key:
        return {
            "line": line,
            "input": value,
            "type": None,
            "identifier": None,
            "state": "invalid",
            "fields": {},
            "sources": {},
            "error": reason,
            "lookup_id": None,
        }
    kind, _, identifier = key.partition(":")
    if summary is not None:
        item = orjson.loads(summary)
    else:
        state = "running" if in_flight is not None else ("cancelled" if status == "cancelled" else "pending")
        lookup_id = in_flight.decode().partition("|")[0] if in_flight else ""
        item = {
            "state": state,
            "fields": {},
            "sources": {},
            "error": None,
            "lookup_id": lookup_id or None,
        }
    return {"line": line, "input": value, "type": kind, "identifier": identifier, **item}


# CSV formula injection (OWASP, https://owasp.org/www-community/attacks/CSV_Injection): a cell that
# starts with = + - @, a tab or a carriage return may run as a formula in a spreadsheet; the cure is
# a leading ' (shown by no spreadsheet).  defusedcsv 3.0.0's writer prefixes ' to a text cell that
# starts with = + - @ | or % and, in that cell only, writes each | as \| (a DDE `cmd|'...'` loses its
# pipe).  It leaves alone a cell that is only a number with an optional leading minus (-5, -1.234,5:
# digits, dots and commas), which a spreadsheet reads as a number, never a formula, and every cell
# that starts otherwise: a CEP (01310-100) or a phone (11 3333-4444) is written as it is, a phone
# written +55 11 ... gets its '.  It does not know OWASP's tab and carriage return: _defused adds
# the ' for those (and then defusedcsv, seeing a ', changes nothing more).  The cost, as with any
# such escaping: a program reading the CSV gets the ' too (a lookup id starting with - reads '-...);
# the JSONL is the format for programs.
#
# Nor does it know that the file is written with `,` but a spreadsheet in Brazil opens a .csv with
# its list separator, `;`: a cell `a;=cmd|' /C calc'!A0` (an input line, an upstream's trade name)
# is then two cells there, the second a formula.  So a trigger right after a `;`, `,`, tab or line
# break inside a cell gets its ' as well (EMBEDDED_TRIGGER).
CONTROL_TRIGGERS = ("\t", "\r")
EMBEDDED_TRIGGER = re.compile(r"([;,\t\r\n][ ]*)(?=[=+\-@|%\t\r])")


def _defused(cell: object) -> object:
    """A cell with a ' before a leading tab or carriage return (defusedcsv handles the other triggers
    at the start of a cell) and before every trigger that follows a separator inside it."""
    if not isinstance(cell, str):
        return cell
    cell = cell[:1] + EMBEDDED_TRIGGER.sub(r"\1'", cell[1:])  # the first character is the start's
    return "'" + cell if cell.startswith(CONTROL_TRIGGERS) else cell


def csv_lines(rows: Iterator[dict]) -> Iterator[str]:
    """Results rows as CSV (CSV_COLUMNS, a header first), a few hundred rows a chunk; `flask batch run`
    writes them too.  Every cell is defused against formula injection (see CONTROL_TRIGGERS)."""
    buffer = io.StringIO()
    writer = defused_csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in rows:
        fields = row["fields"]
        cells = [
            row["line"],
            row["input"],
            row["type"] or "",
            row["identifier"] or "",
            row["state"],
            *(_cell(fields.get(column)) for column in CSV_COLUMNS[5:15]),
            ";".join(f"{name}={state}" for name, state in row["sources"].items()),
            row["error"] or "",
            row["lookup_id"] or "",
        ]
        writer.writerow([_defused(cell) for cell in cells])
        count += 1
        if count % 200 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return str(value)


def jsonl_lines(rows: Iterator[dict]) -> Iterator[bytes]:
    """Results rows as JSON lines, a few hundred rows a chunk."""
    chunk: list[bytes] = []
    for row in rows:
        chunk.append(orjson.dumps(row))
        if len(chunk) == 200:
            yield b"\n".join(chunk) + b"\n"
            chunk = []
    if chunk:
        yield b"\n".join(chunk) + b"\n"
