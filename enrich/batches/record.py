"""What a new batch stores: its hash's fields and counts, its lines (a CPF only masked), its queue,
its items settled at once, and the bytes all that takes (computed here; batches/store.py writes it)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import orjson

from enrich import cpf_answers
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.identifiers import MAX_INPUT_LENGTH, Identifier, IdentifierType

ITEM_STATES = ("pending", "running", "found", "not_found", "partial", "failed", "cancelled")
COUNT_FIELDS = tuple(f"n:{state}" for state in ITEM_STATES)  # the batch hash's counts
SETTLED_STATES = ("found", "not_found", "partial", "failed", "cancelled")
MAX_NAME_LENGTH = 200  # what is kept of a batch's name
MAX_REASON_LENGTH = 200  # what is kept of why a line could not be read
SUMMARY_BYTES = 400  # reserved per queued item for the summary it gets (state, main fields, sources)


def item_key(identifier: Identifier) -> str:
    return f"{identifier.type}:{identifier.value}"


def token_hash(cancel_token: str) -> str:
    """What the batch hash keeps of a cancel token: its SHA-256, hex (a leaked Redis cancels nothing)."""
    return hashlib.sha256(cancel_token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class NewBatch:
    """A batch about to be written: `fields` of its hash, `entries` of `:lines`, `queued` item keys,
    `summaries` of the items settled at once (item key -> JSON), and `size`, the bytes to reserve."""

    fields: dict
    entries: list[bytes]
    queued: list[str]
    summaries: dict[str, bytes]
    size: int


def new_batch(
    parsed: batch_input.ParsedBatch, name: str, cached: Mapping[str, dict], cancel_token: str, now: float
) -> NewBatch:
    """The batch of `parsed`: the items in `cached` (answered from the cache) and its CPFs settled,
    the rest queued.  A CPF settles from the number alone, under a key that is not the number:
    nothing of it is stored but its masked form and what it says of itself (cpf_answers.py)."""
    unique = parsed.unique
    cpfs = [identifier for identifier in unique if identifier.type is IdentifierType.CPF]
    cpf_keys = {identifier.value: f"cpf:{n}" for n, identifier in enumerate(cpfs)}
    queued = [
        item_key(identifier)
        for identifier in unique
        if identifier.type is not IdentifierType.CPF and item_key(identifier) not in cached
    ]
    settled = {**cached, **{cpf_keys[i.value]: batch_rows.cpf_summary(i) for i in cpfs}}
    counts = {state: 0 for state in ITEM_STATES}
    counts["pending"] = len(queued)
    for summary in settled.values():
        counts[summary["state"]] += 1
    valid = len(parsed.lines) - len(parsed.invalid)
    fields = {
        "status": "running",
        "name": cpf_answers.mask_digit_runs(name[:MAX_NAME_LENGTH]),
        "created_at": now,
        "total": len(unique),
        "lines": len(parsed.lines),
        "invalid": len(parsed.invalid),
        "duplicates": valid - len(unique),
        "cached": len(cached),
        "cancel_token_sha256": token_hash(cancel_token),
        **{f"n:{state}": n for state, n in counts.items()},
    }
    entries = [line_entry(entry, cpf_keys) for entry in parsed.lines]
    summaries = {key: orjson.dumps(summary) for key, summary in settled.items()}
    size = sum(map(len, entries)) + sum(map(len, queued)) + sum(map(len, [*summaries, *summaries.values()]))
    size += len(queued) * SUMMARY_BYTES  # what each queued item's summary will add once it settles
    return NewBatch(fields, entries, queued, summaries, size + len(orjson.dumps(fields)))


def line_entry(entry: batch_input.ValidLine | batch_input.InvalidLine, cpf_keys: dict[str, str]) -> bytes:
    """An input line as kept: a CPF (or what looks like one) only masked, its item under `cpf_keys`."""
    if isinstance(entry, batch_input.ValidLine):
        if entry.identifier.type is IdentifierType.CPF:
            masked = cpf_answers.mask_digit_runs(entry.value)
            return orjson.dumps([entry.line, masked, cpf_keys[entry.identifier.value], ""])
        return orjson.dumps([entry.line, entry.value, item_key(entry.identifier), ""])
    # A line it could not read may still hold a CPF (a typo, a prefix, the type column): masked,
    # and cut to what an identifier may be (the rest is no identifier anyway, only bytes).
    value, reason = (
        cpf_answers.mask_digit_runs(text[:limit])
        for text, limit in ((entry.value, MAX_INPUT_LENGTH), (entry.reason, MAX_REASON_LENGTH))
    )
    return orjson.dumps([entry.line, value, "", reason])
