"""`flask lookup`'s watch: follow a lookup's record until its sources settle, and describe them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from enrich.identifiers import Identifier
from enrich.log_redaction import mask_identifier
from enrich.lookups import Lookup, LookupStatus, LookupStore, SourceResult, SourceState
from enrich.sources import sources_for

# Polling the record, not following the event log: the log expires 120 s after completion and a
# reconnecting reader needs the record anyway; one HGETALL every 100 ms is nothing to Redis.
POLL_INTERVAL = 0.1


class LookupGone(Exception):
    """The lookup's record vanished while it was watched (expired or cleaned up)."""


@dataclass
class Watch:
    """What the watcher has reported so far, so each change is printed once."""

    settled: set[str] = field(default_factory=set)
    waiting: dict[str, float | None] = field(default_factory=dict)  # source -> scheduled_at reported
    partial_reported: bool = False


def fully_cached(identifier: Identifier, cache, all_sources: dict) -> bool:
    """Whether every source of this identifier has a fresh cache entry (start_lookup would answer 200)."""
    names = [s.name for s in sources_for(str(identifier.type), all_sources) if s.supports(identifier)]
    return len(cache.get_many(str(identifier.type), names, identifier.value)) == len(names)


def follow(
    store: LookupStore,
    lookup_id: str,
    timeout: float,
    on_settled: Callable[[SourceResult, int, int], None],
    on_note: Callable[[str], None],
) -> tuple[Lookup, bool]:
    """Poll the lookup until it is complete or `timeout` seconds pass; returns (lookup, timed_out).

    `on_settled(result, done, total)` runs once per source as it settles; `on_note(text)` for a
    source that waits for its rate limit (once per scheduled time) and for a deadline's partial.
    """
    deadline = time.monotonic() + timeout
    watch = Watch()
    while True:
        lookup = store.get(lookup_id)
        if lookup is None:
            raise LookupGone(lookup_id)
        report(lookup, watch, on_settled, on_note)
        if lookup.status == LookupStatus.COMPLETE:
            return lookup, False
        if time.monotonic() >= deadline:
            return lookup, True
        time.sleep(POLL_INTERVAL)


def report(
    lookup: Lookup,
    watch: Watch,
    on_settled: Callable[[SourceResult, int, int], None],
    on_note: Callable[[str], None],
) -> None:
    """Tell the callbacks what changed since the last call."""
    total = len(lookup.sources)
    for name, result in lookup.sources.items():
        if result.settled and name not in watch.settled:
            watch.settled.add(name)
            on_settled(result, len(watch.settled), total)
        elif result.state == SourceState.RATE_LIMITED and watch.waiting.get(name) != result.scheduled_at:
            watch.waiting[name] = result.scheduled_at
            on_note(f"{name} waits for its rate limit until {clock(result.scheduled_at)}")
    if lookup.status == LookupStatus.PARTIAL and not watch.partial_reported:
        watch.partial_reported = True
        on_note(f"deadline passed: partial result; still waiting for {', '.join(unsettled(lookup))}")


def clock(epoch: float | None) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch)) if epoch else "-"


def unsettled(lookup: Lookup) -> list[str]:
    """The sources not settled yet, each with its state (and scheduled time when it has one)."""
    return [
        f"{name} ({result.state}" + (f" until {clock(result.scheduled_at)})" if result.scheduled_at else ")")
        for name, result in lookup.sources.items()
        if not result.settled
    ]


def source_line(result: SourceResult, done: int, total: int) -> str:
    """One settled source: `[2/3] receitaws   ok            412 ms`, then cached/stale and any error."""
    elapsed = f"{result.elapsed_ms:.0f} ms" if result.elapsed_ms is not None else "-"
    notes = [word for word, on in (("cached", result.cached), ("stale", result.stale)) if on]
    if result.error:
        notes.append(result.error)
    return f"[{done}/{total}] {result.source:<10} {result.state:<13} {elapsed:>8}  {' '.join(notes)}".rstrip()


def summary_lines(lookup: Lookup) -> list[str]:
    """The lookup's status, how long it took, and its cross-checks."""
    took = (lookup.completed_at or time.time()) - lookup.created_at
    cached = ", all from cache" if lookup.cached else ""
    if not lookup.id:  # a CPF: answered from the number alone, nothing kept; shown masked
        masked = mask_identifier("cpf", lookup.identifier)
        facts = {**((lookup.result or {}).get("data") or {}), "cpf": masked}
        return [
            f"{lookup.status}: {lookup.type} {masked}, from the number alone (no source called, nothing stored)",
            *(
                f"  {check['status']:<10} {check['name']}: {check['detail']}"
                for check in lookup.result["checks"]
            ),
            *(f"  {name:<14} {', '.join(v) if isinstance(v, list) else v}" for name, v in facts.items()),
        ]
    lines = [
        f"{lookup.status}: {lookup.type} {lookup.identifier} in {took * 1000:.0f} ms{cached} (id {lookup.id})"
    ]
    checks = (lookup.result or {}).get("checks") or []
    if checks:
        lines.append("checks:")
        lines.extend(f"  {check['status']:<10} {check['name']}: {check['detail']}" for check in checks)
    elif lookup.status == LookupStatus.COMPLETE:
        lines.append("checks: none for this type")
    return lines
