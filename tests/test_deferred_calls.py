"""deferred_calls.py: calls waiting for their time in one sorted set, and what they name."""

from __future__ import annotations

import time

from enrich.deferred_calls import DeferredCalls


def test_naming_finds_the_ids_a_waiting_call_carries_as_an_argument(settings, redis_client):
    deferred = DeferredCalls(redis_client, settings)
    deferred.add(time.time() + 60, "job_queue.fetch_source", ["lookup-a", "viacep", "cep", "01310100", 5], {})
    deferred.add(
        time.time() + 60, "job_queue.finalize_lookup", ["lookup-b", True], {}, call_id="deadline:lookup-b"
    )

    named = deferred.naming({"lookup-a", "lookup-b", "lookup-c", "viace"}, limit=10)

    assert named == {"lookup-a", "lookup-b"}  # whole arguments only: "viace" is not "viacep"


def test_naming_gives_up_past_its_limit_so_the_caller_assumes_any_may_be_named(settings, redis_client):
    deferred = DeferredCalls(redis_client, settings)
    for n in range(3):
        deferred.add(time.time() + 60, "job_queue.finalize_lookup", [f"lookup-{n}", True], {})

    assert deferred.naming({"lookup-0"}, limit=2) is None
    assert deferred.naming({"lookup-0"}, limit=3) == {"lookup-0"}
