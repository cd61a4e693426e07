"""Upstream garbage (the sandbox's body faults): the source settles `error` with a clear reason,
the worker survives, and nothing of it reaches the cache."""

from __future__ import annotations

import pytest
from conftest import FAST_LIMITS

from enrich.services import services

pytestmark = pytest.mark.slow

# What each kind of garbage must be called in the source's error.
REASONS = {
    "invalid_json": "not valid JSON",
    "html_error": "HTML",
    "truncated": "cut off",
    "wrong_types": "should be",
    "huge": "byte limit",
    "empty": "empty",
}


def test_garbage_bodies_settle_as_clear_errors_and_are_never_cached(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS, RETRY_MAX="1", RETRY_BACKOFF_BASE="0.05", BREAKER_FAIL_MAX="1000")
    sandbox.control("receitaws", quota_per_minute=None)  # this test makes more than 3 calls a minute
    stack.start_worker("w1", concurrency=4)
    stack.start_web()
    cache = services(stack.app).cache
    identifiers = {}
    report = []
    for seed, (kind, reason) in enumerate(REASONS.items(), start=80):
        sandbox.control("opencnpj", body=kind)
        cnpj = identifiers[kind] = sandbox.known("cnpj", seed=seed)
        done = stack.wait_status(stack.post_lookup(cnpj, refresh=True).json()["id"], timeout=30)
        opencnpj = done["sources"]["opencnpj"]
        report.append(f"{kind}: {opencnpj['error']}")
        assert opencnpj["state"] == "error" and opencnpj["attempts"] == 2, report[-1]
        assert reason.lower() in opencnpj["error"].lower(), report[-1]
        assert done["sources"]["brasilapi"]["state"] == "ok" and done["status"] == "complete"
        assert cache.get("cnpj", "opencnpj", cnpj) is None, f"{kind}: garbage reached the cache"
        assert stack.processes["w1"][0].poll() is None, f"{kind}: the worker died\n{stack.log('w1')[-2000:]}"
    print("\n" + "\n".join(report))

    sandbox.control("opencnpj", body=None)
    for kind, cnpj in identifiers.items():
        again = stack.wait_status(stack.post_lookup(cnpj).json()["id"], timeout=30)
        assert again["sources"]["opencnpj"]["state"] == "ok", (kind, again["sources"]["opencnpj"])
        assert again["sources"]["opencnpj"]["cached"] is False  # fetched afresh, not a cached error
