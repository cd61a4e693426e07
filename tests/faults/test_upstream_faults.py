"""Upstream faults on real workers: outage and breaker probes, a slow upstream, quotas, retries exhausted.

Each test injects the fault through the sandbox's `/_control`, runs lookups through gunicorn and
Celery worker processes, and checks what the upstream saw (`/_stats`) as well as what users saw.
"""

from __future__ import annotations

import time

import orjson
import pytest
import requests
from conftest import FAST_LIMITS, wait_for

from enrich.services import services

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer test-admin-token"}


def _events(stack, lookup_id: str) -> list[dict]:
    """The lookup's logged events, decoded, oldest first."""
    events = services(stack.app).events
    return [{**orjson.loads(m.data), "event": m.type} for m in events.read_after(lookup_id)]


# -- outage: the breaker ----------------------------------------------------------------------


def test_outage_opens_the_breaker_across_workers_and_lookups_fall_back(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS, BREAKER_FAIL_MAX="3", BREAKER_RESET_TIMEOUT="2", RETRY_MAX="0")
    stack.start_worker("w1")
    stack.start_worker("w2")
    stack.start_web()
    warm = "11222333000181"
    stack.wait_status(stack.post_lookup(warm).json()["id"])  # leaves a copy of every source in the cache

    sandbox.reset()
    sandbox.control("receitaws", outage=True)
    states = []
    for cnpj in sandbox.identifiers("cnpj", 7, seed=61):
        done = stack.wait_status(stack.post_lookup(cnpj).json()["id"])
        states.append(done["sources"]["receitaws"]["state"])
        assert done["sources"]["brasilapi"]["state"] in ("ok", "not_found")  # other sources unaffected
    assert states == ["error"] * 3 + ["circuit_open"] * 4
    assert sandbox.stats()["upstreams"]["receitaws"]["requests"] == 3  # nothing reached it while open
    assert stack.get("/api/status").json()["breakers"]["receitaws"]["state"] == "open"

    refreshed = stack.wait_status(stack.post_lookup(warm, refresh=True).json()["id"])
    receitaws = refreshed["sources"]["receitaws"]
    assert receitaws["state"] == "stale" and receitaws["stale"] is True and receitaws["data"]["cnpj"] == warm
    assert refreshed["status"] == "complete"

    sandbox.control("receitaws", outage=False)
    opened_at = stack.get("/api/status").json()["breakers"]["receitaws"]["opened_at"]
    wait_for(lambda: time.time() > opened_at + 2.05, timeout=5, message="reset timeout to pass")
    probe = stack.wait_status(stack.post_lookup(sandbox.identifiers("cnpj", 1, seed=62)[0]).json()["id"])
    assert probe["sources"]["receitaws"]["state"] in ("ok", "not_found")
    assert stack.get("/api/status").json()["breakers"]["receitaws"]["state"] == "closed"


def test_after_the_reset_timeout_one_probe_runs_cluster_wide_and_successes_close_the_breaker(
    make_stack, sandbox
):
    stack = make_stack(
        **FAST_LIMITS,
        BREAKER_FAIL_MAX="2",
        BREAKER_RESET_TIMEOUT="1",
        BREAKER_SUCCESS_THRESHOLD="2",
        RETRY_MAX="0",
    )
    stack.start_worker("w1")
    stack.start_worker("w2")
    stack.start_web()
    sandbox.control("receitaws", outage=True)
    for cnpj in sandbox.identifiers("cnpj", 2, seed=71):
        stack.wait_status(stack.post_lookup(cnpj).json()["id"])
    breaker = stack.get("/api/status").json()["breakers"]["receitaws"]
    assert breaker["state"] == "open"

    sandbox.reset()
    sandbox.control(
        "receitaws", latency_ms=1500, quota_per_minute=None
    )  # back, but slow: the probe stays in flight
    wait_for(lambda: time.time() > breaker["opened_at"] + 1.1, timeout=5, message="the reset timeout to pass")
    ids = [stack.post_lookup(cnpj).json()["id"] for cnpj in sandbox.identifiers("cnpj", 12, seed=72)]
    done = [stack.wait_status(i, timeout=30) for i in ids]
    states = sorted(d["sources"]["receitaws"]["state"] for d in done)
    # 16 worker threads in two processes saw the breaker half-open at once: one probe went through.
    assert sandbox.stats()["upstreams"]["receitaws"]["requests"] == 1, states
    assert states.count("circuit_open") == 11 and all(d["status"] == "complete" for d in done)
    assert (
        stack.get("/api/status").json()["breakers"]["receitaws"]["state"] == "half-open"
    )  # 1 of 2 successes

    closing = stack.wait_status(stack.post_lookup(sandbox.identifiers("cnpj", 1, seed=73)[0]).json()["id"])
    assert closing["sources"]["receitaws"]["state"] in ("ok", "not_found")
    assert stack.get("/api/status").json()["breakers"]["receitaws"]["state"] == "closed"
    assert sandbox.stats()["upstreams"]["receitaws"]["requests"] == 2


# -- a slow upstream ----------------------------------------------------------------------------


def test_a_slow_upstream_times_out_and_retries_without_holding_a_worker_past_the_timeout(make_stack, sandbox):
    stack = make_stack(
        **FAST_LIMITS, TIMEOUT_OPENCNPJ="0.5", RETRY_MAX="2", RETRY_BACKOFF_BASE="0.2", BREAKER_FAIL_MAX="50"
    )
    sandbox.control("opencnpj", latency_ms=3000, quota_per_minute=None)
    stack.start_worker("w1", concurrency=2)
    stack.start_web()
    cnpj = sandbox.known("cnpj", seed=74)
    started = time.monotonic()
    lookup_id = stack.post_lookup(cnpj).json()["id"]
    done = stack.wait_status(lookup_id, timeout=20)
    took = time.monotonic() - started
    opencnpj = done["sources"]["opencnpj"]
    assert opencnpj["state"] == "error" and opencnpj["attempts"] == 3
    assert "no answer within 0.5s" in opencnpj["error"], opencnpj["error"]
    assert done["sources"]["brasilapi"]["state"] == "ok"  # the other calls were not starved
    events = [e for e in _events(stack, lookup_id) if e["event"] == "source" and e["source"] == "opencnpj"]
    for running, after in zip(events, events[1:], strict=False):
        if running["state"] == "running":  # a call: from its start to its outcome, at most the timeout
            assert after["timestamp"] - running["timestamp"] < 0.5 + 0.35, (running, after)
    # Three attempts of 0.5 s plus two backoffs (at most 0.2 and 0.4 s), far from 3 x 3 s of upstream latency.
    assert took < 6, f"the lookup took {took:.1f} s"


# -- quotas ---------------------------------------------------------------------------------------


def test_a_burst_over_three_workers_never_trips_the_upstream_quota(make_stack, sandbox, page):
    quota = 300  # ReceitaWS' 3 per minute scaled up 100 times, as the limiter is (95% of it, burst 1)
    stack = make_stack(
        **{**FAST_LIMITS, "RATE_LIMIT_RECEITAWS": str(quota * 0.95), "RETRY_MAX": "0", "LOOKUP_DEADLINE": "3"}
    )
    sandbox.control("receitaws", quota_per_minute=quota)
    for name in ("w1", "w2", "w3"):
        stack.start_worker(name, concurrency=4)
    stack.start_web()
    started = time.time()
    ids = [stack.post_lookup(cnpj).json()["id"] for cnpj in sandbox.identifiers("cnpj", 50, seed=75)]

    page.goto(f"{stack.web_url}/lookups/{ids[-1]}")  # the last one waits longest for its token
    badge = page.wait_for_selector('.source-card[data-source="receitaws"] [data-badge="rate-limited"]')
    assert ":" in badge.inner_text()  # "runs at 09:41:07"

    first = [stack.wait_status(i, statuses=("partial", "complete"), timeout=10) for i in ids]
    assert all(d["deadline_at"] <= started + 3 + 5 for d in first)  # each answered by its deadline
    partial = [d for d in first if d["status"] == "partial"]
    assert partial, "the burst fitted in the deadline: the test proves nothing about deferred calls"
    assert all(
        d["sources"]["receitaws"]["scheduled_at"]
        for d in partial
        if d["sources"]["receitaws"]["state"] == "rate_limited"
    )
    done = [stack.wait_status(i, timeout=30) for i in ids]  # the deferred calls all run later
    assert all(d["sources"]["receitaws"]["state"] in ("ok", "not_found") for d in done)
    assert sandbox.stats()["upstreams"]["receitaws"]["by_status"].get("429", 0) == 0
    assert sandbox.stats()["upstreams"]["receitaws"]["requests"] == 50


# -- retries exhausted ------------------------------------------------------------------------------


def test_transient_failures_retry_with_backoff_then_dead_letter_and_requeue(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS, RETRY_MAX="3", RETRY_BACKOFF_BASE="0.2", BREAKER_FAIL_MAX="50")
    stack.start_worker()
    stack.start_web()
    sandbox.control("opencnpj", error_rate=1.0)
    cnpj = sandbox.identifiers("cnpj", 1, seed=31)[0]
    lookup_id = stack.post_lookup(cnpj).json()["id"]
    done = stack.wait_status(lookup_id, timeout=30)
    opencnpj = done["sources"]["opencnpj"]
    assert (
        opencnpj["state"] == "error" and opencnpj["attempts"] == 4 and "gave up after 4" in opencnpj["error"]
    )
    assert sandbox.stats()["upstreams"]["opencnpj"]["requests"] == 4
    retries = [e for e in _events(stack, lookup_id) if e["event"] == "source" and e["state"] == "retrying"]
    delays = [e["scheduled_at"] - e["timestamp"] for e in retries]
    assert len(delays) == 3
    # equal jitter: attempt n waits between half and all of 0.2 * 2**n
    for attempt, delay in enumerate(delays):
        assert 0.1 * 2**attempt - 0.01 <= delay <= 0.2 * 2**attempt + 0.01, delays

    headers = ADMIN
    letters = stack.get("/api/admin/dead-letters", headers=headers).json()
    entry = next(item for item in letters["items"] if item["lookup_id"] == lookup_id)
    assert entry["source"] == "opencnpj" and "500" in entry["error"]

    sandbox.control("opencnpj", error_rate=0.0)
    requeued = requests.post(
        f"{stack.web_url}/api/admin/dead-letters/{entry['id']}/requeue", headers=headers, timeout=10
    )
    assert requeued.status_code == 202
    wait_for(
        lambda: stack.get(f"/api/lookups/{lookup_id}").json()["sources"]["opencnpj"]["state"] == "ok",
        timeout=15,
        message="requeued call to succeed",
    )
    assert stack.get(f"/api/tasks/{requeued.json()['task_id']}").json()["state"] == "SUCCESS"
    assert stack.get("/api/admin/dead-letters", headers=headers).json()["count"] == 0
