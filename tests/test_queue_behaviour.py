"""Job-queue behaviour on real workers: priorities, cluster-wide rate limits, retries, deadlines, beat."""

from __future__ import annotations

import orjson
from conftest import FAST_LIMITS, wait_for

from enrich.services import services


def _events(stack, lookup_id: str) -> list[dict]:
    """The lookup's logged events, decoded, oldest first."""
    events = services(stack.app).events
    return [{**orjson.loads(m.data), "event": m.type} for m in events.read_after(lookup_id)]


def test_urgent_lookups_submitted_after_a_backlog_finish_first(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS)
    stack.start_web()
    backlog = [
        stack.post_lookup(cep, priority=1).json()["id"] for cep in sandbox.identifiers("cep", 30, seed=11)
    ]
    urgent = [
        stack.post_lookup(cep, priority=10).json()["id"] for cep in sandbox.identifiers("cep", 4, seed=12)
    ]
    stack.start_worker(concurrency=1)
    finished = {i: stack.wait_status(i, timeout=60)["completed_at"] for i in backlog + urgent}
    order = sorted(finished, key=finished.get)
    # Every urgent lookup finishes before all but the few backlog items already taken by the worker.
    last_urgent = max(order.index(i) for i in urgent)
    assert last_urgent < len(urgent) + 3, [("U" if i in urgent else "b") for i in order]


def test_two_workers_share_one_rate_limit_and_a_wait_costs_no_retry(make_stack, sandbox):
    rate_per_minute = 240  # one call every 0.25 s, burst 1, no batch reserve: the bucket holds 1
    limits = {"RATE_LIMIT_RECEITAWS": str(rate_per_minute), "BATCH_TOKEN_RESERVE": "0", "RETRY_MAX": "0"}
    stack = make_stack(**{**FAST_LIMITS, **limits})
    sandbox.control("receitaws", quota_per_minute=rate_per_minute + 10)
    stack.start_worker("w1")
    stack.start_worker("w2")
    stack.start_web()
    ids = [stack.post_lookup(cnpj).json()["id"] for cnpj in sandbox.identifiers("cnpj", 12, seed=21)]
    done = [stack.wait_status(i, timeout=30) for i in ids]
    assert all(d["sources"]["receitaws"]["state"] in ("ok", "not_found") for d in done), [
        d["sources"]["receitaws"] for d in done
    ]
    assert all(d["sources"]["receitaws"]["attempts"] == 1 for d in done)  # waiting for a token is no retry
    # What the upstream saw, by the kernel's receive stamps: a call waiting for its token is sent a
    # little ahead of it (its "running" event comes early) and waits at its send slot, which is
    # never before the token's time.
    starts = sandbox.arrivals("receitaws")
    assert len(starts) == 12
    rate = rate_per_minute / 60
    # Calls reach the upstream when their reserved token exists, never before, so over the run the
    # two workers together stay at the bucket's rate (the first call took the burst's token), and
    # no second holds more than rate + burst (the README's rule).
    assert (len(starts) - 1) / (starts[-1] - starts[0]) <= rate * 1.02, starts
    for i, first in enumerate(starts):
        assert sum(1 for t in starts[i:] if t < first + 1.0) <= rate + 1, starts
    limited = [
        e for i in ids for e in _events(stack, i) if e["event"] == "source" and e["state"] == "rate_limited"
    ]
    assert limited and all(e["scheduled_at"] for e in limited)
    assert sandbox.stats()["upstreams"]["receitaws"]["by_status"].get("429", 0) == 0


def test_lookup_turns_partial_at_its_deadline_and_complete_when_the_deferred_call_runs(make_stack, sandbox):
    limits = {"RATE_LIMIT_RECEITAWS": "12", "BATCH_TOKEN_RESERVE": "0", "LOOKUP_DEADLINE": "1.0"}
    stack = make_stack(**{**FAST_LIMITS, **limits})
    stack.start_worker()
    stack.start_web()
    first, second = sandbox.identifiers("cnpj", 2, seed=41)
    stack.wait_status(stack.post_lookup(first).json()["id"])  # takes ReceitaWS's only token (no reserve)
    lookup_id = stack.post_lookup(second).json()["id"]
    partial = stack.wait_status(lookup_id, statuses=("partial",), timeout=10)
    receitaws = partial["sources"]["receitaws"]
    assert receitaws["state"] == "rate_limited" and receitaws["scheduled_at"] > partial["deadline_at"]
    assert partial["sources"]["brasilapi"]["state"] in ("ok", "not_found")
    done = stack.wait_status(lookup_id, timeout=15)
    assert done["sources"]["receitaws"]["state"] in ("ok", "not_found")
    assert done["completed_at"] >= receitaws["scheduled_at"] - 0.5
    types = [e["event"] for e in _events(stack, lookup_id)]
    assert types.index("partial") < types.index("complete") and types.count("complete") == 1


def test_beat_cleans_up_expired_lookups_and_records_health_checks(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS, HEALTH_CHECK_INTERVAL="1", CLEANUP_INTERVAL="1", LOOKUP_RETENTION="2")
    stack.start_worker()
    stack.start_web()
    lookup_id = stack.post_lookup(sandbox.identifiers("cep", 1, seed=51)[0]).json()["id"]
    stack.wait_status(lookup_id)
    events_key = services(stack.app).events.stream_key(lookup_id)
    assert services(stack.app).redis.exists(events_key)
    stack.start_beat()
    health = wait_for(
        lambda: stack.get("/api/status").json()["health_check"], timeout=20, message="health check"
    )
    assert health["redis"]["ok"] and health["workers"] and set(health["breakers"]) >= {"brasilapi", "viacep"}
    wait_for(lambda: stack.get(f"/api/lookups/{lookup_id}").status_code == 404, timeout=20, message="cleanup")
    assert not services(stack.app).redis.exists(events_key)

    # The run that deleted it records its report when it ends, a moment after the delete.
    def report() -> dict | None:
        cleanup = stack.get("/api/status").json()["cleanup"]
        return cleanup if cleanup and cleanup["removed"]["lookups"] >= 1 else None

    wait_for(report, timeout=20, message="the report of the cleanup that removed it")
