"""A worker node SIGKILLed mid-run: its unacknowledged tasks come back and every lookup completes once."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import FAST_LIMITS, wait_for

from enrich.services import services
from enrich.task_messages import celery_priority

pytestmark = pytest.mark.slow

LOOKUPS = 300


def _complete_events(app, lookup_id: str) -> int:
    events = services(app).events
    return sum(1 for message in events.read_after(lookup_id) if message.type == "complete")


def test_killing_a_worker_node_loses_no_lookup(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS, VISIBILITY_TIMEOUT="5", LOOKUP_DEADLINE="60")
    for name in ("brasilapi", "opencnpj", "receitaws"):  # keep work in flight long enough to kill it mid-run
        sandbox.control(name, latency_ms=150, quota_per_minute=None)
    stack.start_worker("w1", concurrency=8)
    stack.start_worker("w2", concurrency=8)
    stack.start_web()
    identifiers = sandbox.identifiers("cnpj", LOOKUPS, seed=9000)
    created = {}
    for identifier in identifiers:
        response = stack.post_lookup(identifier, refresh=True)
        assert response.status_code == 202, response.text
        created[response.json()["id"]] = identifier

    app = stack.app
    store = services(app).lookups

    def completed() -> int:
        return sum(1 for lookup_id in created if store.get(lookup_id).status == "complete")

    wait_for(lambda: sandbox.served("brasilapi") >= LOOKUPS // 5, timeout=60, message="the run to get going")
    stack.kill("w2", signal.SIGKILL)  # the node and its whole pool, mid-run
    killed_at = time.monotonic()
    done_at_kill = completed()
    assert done_at_kill < LOOKUPS, "every lookup finished before the kill: the test proves nothing"

    try:
        wait_for(
            lambda: completed() == LOOKUPS,
            timeout=90,
            interval=0.5,
            message=f"all {LOOKUPS} lookups to complete after the kill ({done_at_kill} done at the kill)",
        )
    except AssertionError:
        stuck = [store.get(i) for i in created if store.get(i).status != "complete"]
        report = [
            (lookup.id, lookup.status, {n: str(r.state) for n, r in lookup.sources.items()})
            for lookup in stuck[:10]
        ]
        raise AssertionError(f"{len(stuck)} lookups never completed, e.g. {report}") from None
    recovery = time.monotonic() - killed_at

    cache = services(app).cache
    wrong = []
    for lookup_id, identifier in created.items():
        lookup = store.get(lookup_id)
        assert _complete_events(app, lookup_id) == 1, (
            f"lookup {lookup_id}: complete published not exactly once"
        )
        for name, result in lookup.sources.items():
            assert result.state in ("ok", "not_found"), f"{lookup_id} {name}: {result.state} {result.error}"
            entry = cache.get("cnpj", name, identifier)
            if entry is None or entry.found != (result.state == "ok") or entry.data != result.data:
                wrong.append((identifier, name))
            elif result.state == "ok" and result.data.get("cnpj") != identifier:
                wrong.append((identifier, name, "data of another company"))
    assert wrong == [], f"{len(wrong)} cache entries disagree with their lookups: {wrong[:5]}"
    # Redelivery after the visibility timeout (5 s here) plus the remaining work, not the 60 s deadline.
    assert recovery < 45, f"recovery took {recovery:.1f} s"
    print(f"\n{LOOKUPS} lookups, {done_at_kill} complete at the kill, all complete {recovery:.1f} s after it")


def test_a_lookup_whose_task_was_lost_is_sent_again_at_its_deadline(app, sandbox):
    """A web process killed between writing a lookup's record and sending its task leaves a lookup
    with no message (the broker itself loses none: test_broker_take.py).  At the deadline, a lookup with no source started and no message for it
    anywhere on the broker gets its task again; while a message for it waits, it does not."""
    import orjson

    from enrich import pipeline, redis_broker
    from enrich.identifiers import parse

    client, prefix = services(app).redis, services(app).settings.key_prefix
    queue = f"{prefix}:celery:celery:{celery_priority(5)}"
    unacked = f"{prefix}:celery:unacked"
    queued, lost, held = (parse(value) for value in sandbox.identifiers("cep", 3, seed=9100))
    with app.app_context():  # no worker: each lookup's task stays where the test puts it
        waiting, _ = pipeline.start_lookup(services(), queued)
        assert pipeline.finalize(services(), waiting.id, at_deadline=True) == "partial"
        assert client.llen(queue) == 1  # its message is still queued: nothing sent again

        gone, _ = pipeline.start_lookup(services(), lost)
        client.delete(queue)  # both messages lost
        assert pipeline.finalize(services(), gone.id, at_deadline=True) == "partial"
        resent = [orjson.loads(raw) for raw in client.lrange(queue, 0, -1)]
        assert len(resent) == 1 and resent[0]["headers"]["task"] == "job_queue.fetch_lookup"
        assert redis_broker.mentions(resent[0], gone.id)

        taken, _ = pipeline.start_lookup(services(), held)
        message = client.lpop(queue)
        while message is not None and not redis_broker.mentions(orjson.loads(message), taken.id):
            message = client.lpop(queue)
        client.delete(queue)
        client.hset(unacked, "tag", orjson.dumps([orjson.loads(message), "", "celery"]))  # a worker has it
        assert pipeline.finalize(services(), taken.id, at_deadline=True) == "partial"
        assert client.llen(queue) == 0
