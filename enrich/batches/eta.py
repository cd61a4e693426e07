"""A running batch's ETA: its items left at the slowest of the paces its rate limits, its measured
throughput and its items' held calls allow (read only; the store gathers what it needs).

The three paces: what the sources' rate limits allow (`rate_limit_pace`); the throughput measured
lately (the workers, the upstreams' latency, other traffic); and what the items' held calls allow.
An item whose call waits for its source's rate limit (a token above the reserve, room in the log of
starts: at most BATCH_SOURCE_WAIT, then it skips the source) keeps its place among the items in
flight all that time, so n items in flight whose held calls were given W seconds in all get through
at most n / (W / n) items a second, taking the items to come to meet the waits of those in flight
(`held_calls`).  The first two alone said 0.2 s while each item waited ~5 s for ReceitaWS: the rate
pace counts only the sources an item waits for every time, and the measured one needs seconds of
history.  The ETA is never less than the longest wait a held call of an item in flight still has
ahead of it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from enrich.lookups import LookupStore, SourceState
from enrich.sources import Source, sources_for

NOTHING_LEFT = {"eta_seconds": 0.0, "throughput_per_second": None, "rate_limit_per_second": None}


def estimate(
    left: int,
    done: int,
    pace_sample: tuple[float, int],
    kinds: list[str],
    started: list[tuple[str, str]],
    sources: Mapping[str, Source],
    lookups: LookupStore,
    source_wait: float,
) -> dict:
    """The status's ETA fields for `left` items not settled, `done` settled since creation (the
    cached ones not counted), `pace_sample` (time, done then) some seconds old, the types of the
    items to come (`kinds`) and the items in flight whose lookups started, as (record id, type)."""
    limit = rate_limit_pace(kinds, sources, source_wait)
    measured = None
    then_t, then_done = pace_sample
    now = time.time()
    if then_t and now - then_t >= 2:
        measured = max(0.0, (done - then_done) / (now - then_t))
    in_flight, given, ahead = held_calls(started, sources, lookups)
    held = in_flight * in_flight / given if given > 0 else None
    paces = [pace for pace in (limit, measured, held) if pace]
    eta = left / min(paces) if paces else None
    if ahead > 0:
        eta = max(eta or 0.0, ahead)
    return {
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "throughput_per_second": round(measured, 3) if measured is not None else None,
        "rate_limit_per_second": round(limit, 3) if limit else None,
    }


def rate_limit_pace(kinds: list[str], sources: Mapping[str, Source], source_wait: float) -> float | None:
    """Items a second the rate limits allow for items of these types (one entry per item).

    An item waits for every source of its type that can give it a token within
    BATCH_SOURCE_WAIT (the slowest of those paces it); a slower source is skipped.
    """
    if not kinds:
        return None
    paces = {}
    for kind in set(kinds):
        rates = [
            s.settings.rate_per_minute / 60.0
            for s in sources_for(kind, sources)
            if s.settings.rate_per_minute > 0
        ]
        waited = [rate for rate in rates if 1.0 / rate <= source_wait]
        paces[kind] = min(waited or rates or [0.0])
    # Seconds per item, averaged over the mix of types left.
    per_item = sum(1.0 / paces[kind] if paces[kind] else 0.0 for kind in kinds) / len(kinds)
    return 1.0 / per_item if per_item else None


def held_calls(
    started: list[tuple[str, str]], sources: Mapping[str, Source], lookups: LookupStore
) -> tuple[int, float, float]:
    """The items in flight and their calls waiting for a rate limit, read off their lookups' records
    (a waiting call is `rate_limited` with `scheduled_at`, the due time of its entry in the deferred
    set): (items in flight, the waits their calls were given, each item's longest one summed (its due
    time less when it was set), the longest wait still ahead of one)."""
    if not started:
        return 0, 0.0, 0.0
    wanted = [(work_id, [s.name for s in sources_for(kind, sources)]) for work_id, kind in started]
    now, given, ahead = time.time(), 0.0, 0.0
    for states in lookups.source_states(wanted):
        waits = [
            (state.scheduled_at, state.updated_at or now)
            for state in states
            if state.state == SourceState.RATE_LIMITED and state.scheduled_at
        ]
        if waits:
            given += max(0.0, max(due - since for due, since in waits))
            ahead = max(ahead, max(due for due, _ in waits) - now)
    return len(started), given, ahead
