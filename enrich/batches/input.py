"""Reading a bulk batch's identifiers: a JSON list or a CSV (`,` or `;`, optional header and type column).

It turns what a team uploads into one entry per input
line, valid or not, so that a batch's results can answer line for line, and a list of the distinct
identifiers to look up.  A bad row is reported with its line and reason and never fails the batch;
only a batch over the row limit, or a body that is not text, is refused as a whole.  The CSV is
read with the standard library's `csv` module (quoted fields, Windows line endings); what it does
not decide for us is the delimiter and whether the first row is a header, both chosen here.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from enrich.identifiers import Identifier, InvalidIdentifier, parse

HEADER_NAMES = ("identifier", "type")


class BatchRejected(ValueError):
    """The batch as a whole cannot be read (too many rows, not UTF-8 text, wrong shape)."""


@dataclass(frozen=True)
class ValidLine:
    """An input line that names an identifier."""

    line: int
    value: str
    identifier: Identifier


@dataclass(frozen=True)
class InvalidLine:
    """An input line that does not, and why."""

    line: int
    value: str
    reason: str

    def to_dict(self) -> dict:
        return {"line": self.line, "value": self.value, "reason": self.reason}


@dataclass
class ParsedBatch:
    """Every data line in input order, and the distinct identifiers among them (first seen first)."""

    lines: list[ValidLine | InvalidLine] = field(default_factory=list)

    @property
    def invalid(self) -> list[InvalidLine]:
        return [entry for entry in self.lines if isinstance(entry, InvalidLine)]

    @property
    def unique(self) -> list[Identifier]:
        seen: dict[tuple[str, str], Identifier] = {}
        for entry in self.lines:
            if isinstance(entry, ValidLine):
                seen.setdefault((entry.identifier.type, entry.identifier.value), entry.identifier)
        return list(seen.values())


def _append(batch: ParsedBatch, entry: ValidLine | InvalidLine, max_rows: int) -> None:
    if len(batch.lines) >= max_rows:
        raise BatchRejected(f"a batch holds at most {max_rows:,} rows")
    batch.lines.append(entry)


def _add(batch: ParsedBatch, line: int, value: str, kind: str | None, max_rows: int) -> None:
    """The line's identifier, or why it is not one (an empty type means: detect it)."""
    try:
        entry: ValidLine | InvalidLine = ValidLine(line, value, parse(value, kind or None))
    except InvalidIdentifier as error:
        entry = InvalidLine(line, value, error.message)
    _append(batch, entry, max_rows)


def decode(raw: bytes) -> str:
    """A CSV upload's text: UTF-8, a byte-order mark dropped (spreadsheets write one)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BatchRejected(f"the file is not UTF-8 text (byte {error.start} cannot be read)") from error


def _delimiter(text: str) -> str:
    """`;` when the first data line has one and no comma (spreadsheets in pt-BR write `;`), else `,`."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return ";" if ";" in first and "," not in first else ","


def _is_header(cells: list[str]) -> bool:
    names = [cell.strip().lower() for cell in cells]
    return bool(names) and names[0] == HEADER_NAMES[0] and names[1:] in ([], [HEADER_NAMES[1]])


def parse_csv(text: str, max_rows: int) -> ParsedBatch:
    """One identifier per row, optionally a type in a second column; blank rows are skipped."""
    batch = ParsedBatch()
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    first = True
    try:
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if first and _is_header(cells):
                first = False
                continue
            first = False
            value = cells[0].strip()
            if len(cells) > 2 and any(cell.strip() for cell in cells[2:]):
                reason = f"expected identifier[,type], got {len(cells)} columns"
                _append(batch, InvalidLine(line, value, reason), max_rows)
                continue
            _add(batch, line, value, cells[1].strip() if len(cells) > 1 else None, max_rows)
    except csv.Error as error:
        raise BatchRejected(f"line {reader.line_num}: {error}") from error
    return batch


def parse_json(items: object, max_rows: int) -> ParsedBatch:
    """`identifiers` of a JSON body: strings, or objects `{"identifier", "type"?}`; line = position (from 1)."""
    if not isinstance(items, list):
        raise BatchRejected("identifiers must be a list of strings or {identifier, type} objects")
    batch = ParsedBatch()
    for line, item in enumerate(items, start=1):
        if isinstance(item, str):
            _add(batch, line, item.strip(), None, max_rows)
        elif isinstance(item, dict) and isinstance(item.get("identifier"), str):
            kind = item.get("type")
            if kind is not None and not isinstance(kind, str):
                _append(
                    batch, InvalidLine(line, item["identifier"], "type must be cnpj, cep or cpf"), max_rows
                )
                continue
            _add(batch, line, item["identifier"].strip(), kind, max_rows)
        else:
            shown = item if isinstance(item, int | float | bool) or item is None else type(item).__name__
            reason = "each item must be a string or {identifier, type}"
            _append(batch, InvalidLine(line, str(shown), reason), max_rows)
    return batch
