"""Circuit breakers on real workers: an upstream outage opens the breaker cluster-wide, lookups
still complete (stale copy or circuit_open), and a probe closes it once the upstream is back."""

from __future__ import annotations

import time

from conftest import FAST_LIMITS, wait_for


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
