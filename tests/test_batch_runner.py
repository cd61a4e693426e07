"""batches/runner.py: creating a batch and sending its steps, a step's starts and settlements, lost-work
detection, the kick a stalled batch gets when its status is read.  The runner's functions are called
directly on the real Redis with no worker: the test reads what they sent off the broker's lists."""

from __future__ import annotations

import time

import orjson
import pytest

from enrich import pipeline, redis_broker
from enrich.batches import input as batch_input
from enrich.batches.runner import STALL_SECONDS, STEP_TASK
from enrich.identifiers import parse
from enrich.lookups import LookupStatus, SourceResult, SourceState
from enrich.services import services
from enrich.sources import sources_for
from enrich.web.batch_api import batch_links

CEPS = [f"0131{n:04d}" for n in range(10)]
CPF = "111.444.777-35"


def parsed(*values: str) -> batch_input.ParsedBatch:
    return batch_input.parse_json(list(values), 1000)


def sent(app, task: str) -> list[list]:
    """The arguments of every `task` message waiting on the broker."""
    client, prefix = services(app).redis, services(app).settings.key_prefix
    found = []
    for queue in redis_broker.priority_lists(prefix):
        for raw in client.lrange(queue, 0, -1):
            message = orjson.loads(raw)
            if message["headers"]["task"] == task:
                args, _, _ = orjson.loads(redis_broker.message_text(message))
                found.append(args)
    return found


def deferred_steps(app, batch_id: str) -> int:
    """Steps of this batch waiting in the deferred set (one entry per batch, whatever the chains)."""
    client, deferred = services(app).redis, services(app).deferred
    members = [orjson.loads(raw) for raw in client.zrange(deferred.key, 0, -1)]
    return sum(1 for member in members if member["id"] == f"batch-step:{batch_id}")


def events(app, batch_id: str) -> list[tuple[str, dict]]:
    log = services(app).events.read_after(services(app).batches.channel(batch_id))
    return [(message.type, orjson.loads(message.data)) for message in log]


def stall(app, batch_id: str) -> None:
    """No step for a minute: as after the worker that held the step chain was lost."""
    store = services(app).batches
    services(app).redis.hset(store.key(batch_id), "stepped_at", time.time() - 60)


def answer_all(app, lookup_id: str, state: SourceState = SourceState.NOT_FOUND) -> None:
    """The worker's part: every source of the lookup answers, and the lookup is finalized."""
    lookups = services(app).lookups
    for name in lookups.get(lookup_id).sources:
        lookups.set_source(lookup_id, SourceResult(name, state, updated_at=time.time()))
    assert pipeline.finalize(services(app), lookup_id) == "complete"


def test_create_settles_the_cached_items_and_sends_one_step_for_the_rest(app):
    cache, sources = services(app).cache, services(app).sources
    cached = parse(CEPS[1])
    for source in sources_for("cep", sources):
        if source.supports(cached):
            cache.set("cep", source.name, cached.value, None, found=False)
    with app.app_context():
        created = services(app).batch_runner.create(parsed(CEPS[0], CEPS[1], CPF), "mixed")

    assert created["counts"]["pending"] == 1 and created["counts"]["not_found"] == 1
    assert created["counts"]["found"] == 1 and created["cached"] == 1  # the CPF; the cached CEP
    assert created["links"] == batch_links(created["id"]) and created["cancel_token"]
    assert list(created)[-2:] == ["links", "cancel_token"]  # the API's order
    assert sent(app, STEP_TASK) == [[created["id"]]]


def test_create_with_nothing_to_look_up_sends_no_step(app):
    with app.app_context():
        created = services(app).batch_runner.create(parsed(CPF, "nonsense"))

    assert created["status"] == "complete" and sent(app, STEP_TASK) == []


def test_post_creates_the_batch_and_sends_its_first_step(app):
    response = app.test_client().post("/api/batches", json={"identifiers": CEPS[:2]})

    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == body["links"]["self"] == f"/api/batches/{body['id']}"
    assert sent(app, STEP_TASK) == [[body["id"]]]


def test_a_step_starts_items_up_to_the_concurrency_and_schedules_the_next(make_app):
    app = make_app(batch_concurrency=2)
    store, runner, lookups = (services(app).batches, services(app).batch_runner, services(app).lookups)
    batch_id = store.create(parsed(*CEPS[:3]))["id"]
    with app.app_context():
        assert runner.step(batch_id) == "stepped"

        in_flight = store.in_flight(batch_id)
        assert len(in_flight) == 2 and all(item.lookup_id for item in in_flight.values())
        assert {lookups.get(item.lookup_id).priority for item in in_flight.values()} == {
            pipeline.BATCH_PRIORITY
        }
        assert len(sent(app, pipeline.LOOKUP_TASK)) == 2
        assert deferred_steps(app, batch_id) == 1
        assert store.last_step_at(batch_id) == pytest.approx(time.time(), abs=5)
        ((kind, status),) = events(app, batch_id)
        assert kind == "progress" and status["counts"]["running"] == 2
        assert status["links"] == batch_links(batch_id)  # the events carry the routes' links

        assert runner.step(batch_id) == "stepped"  # nothing settled, no room: nothing more starts
    counts = store.status(batch_id)["counts"]
    assert (counts["pending"], counts["running"]) == (1, 2)
    assert deferred_steps(app, batch_id) == 1  # the next step's entry, merged: one chain
    assert len(events(app, batch_id)) == 1  # no change, no progress event


def test_a_step_settles_items_whose_lookups_completed_and_ends_the_batch(app):
    store, runner = services(app).batches, services(app).batch_runner
    batch_id = store.create(parsed(CEPS[0]))["id"]
    with app.app_context():
        runner.step(batch_id)
        (item,) = store.in_flight(batch_id).values()
        answer_all(app, item.work_id)

        assert runner.step(batch_id) == "finished"
        assert runner.step(batch_id) == "finished"  # a step left over: the chain ends

    status = store.status(batch_id)
    assert status["status"] == "complete" and status["counts"]["not_found"] == 1
    (row,) = store.rows(batch_id)
    assert row["state"] == "not_found" and row["lookup_id"] == item.lookup_id
    kinds = [kind for kind, _ in events(app, batch_id)]
    assert kinds == ["progress", "progress", "complete"]
    assert events(app, batch_id)[-1][1]["links"] == batch_links(batch_id)


def test_a_step_of_a_gone_batch_does_nothing_and_a_locked_one_only_reschedules(app):
    store, runner = services(app).batches, services(app).batch_runner
    batch_id = store.create(parsed(CEPS[0]))["id"]
    services(app).redis.set(store.key(batch_id, "step"), "another step", ex=5)
    with app.app_context():
        assert runner.step("no-such-batch") == "gone"
        assert runner.step(batch_id) == "busy"

    assert store.in_flight(batch_id) == {} and deferred_steps(app, batch_id) == 1


def test_an_item_whose_lookup_expired_settles_failed(app):
    store, runner, lookups = (services(app).batches, services(app).batch_runner, services(app).lookups)
    batch_id = store.create(parsed(CEPS[0]))["id"]
    with app.app_context():
        runner.step(batch_id)
        (item,) = store.in_flight(batch_id).values()
        services(app).redis.delete(lookups.record_key(item.work_id))

        assert runner.step(batch_id) == "finished"

    (row,) = store.rows(batch_id)
    assert row["state"] == "failed" and row["error"] == "its lookup expired before it completed"


def test_an_item_claimed_by_a_step_that_was_lost_is_started_by_the_next(app):
    store, runner = services(app).batches, services(app).batch_runner
    batch_id = store.create(parsed(CEPS[0]))["id"]
    (key,) = store.claim(batch_id, 5, time.time(), 0)  # the lost step claimed it, and stopped there
    assert store.in_flight(batch_id)[key].lookup_id == ""
    with app.app_context():
        runner.step(batch_id)

    assert store.in_flight(batch_id)[key].lookup_id and len(sent(app, pipeline.LOOKUP_TASK)) == 1


def _overdue_item(store, runner, lookups, batch_id: str):
    """The batch's first item started, its lookup's sources running since ten seconds ago (past
    `item_limit`): (its key, its in-flight entry)."""
    runner.step(batch_id)
    ((key, item),) = store.in_flight(batch_id).items()
    long_ago = time.time() - 10
    store.mark_started(batch_id, key, item.lookup_id, long_ago, None)
    for name in lookups.get(item.lookup_id).sources:
        lookups.set_source(item.lookup_id, SourceResult(name, SourceState.RUNNING, updated_at=long_ago))
    return key, item


def test_an_item_whose_work_is_lost_for_good_settles_failed_saying_so(make_app):
    """Its lookup did nothing for `item_limit` and no task of it is left anywhere (the broker's
    lists and the deferred set emptied, as by a Redis that lost them): a step settles it."""
    app = make_app(visibility_timeout=1, batch_item_timeout=2.0)
    store, runner, lookups = (services(app).batches, services(app).batch_runner, services(app).lookups)
    client, prefix = services(app).redis, services(app).settings.key_prefix
    assert runner.item_limit == 3.0  # never less than VISIBILITY_TIMEOUT and two sweeps
    batch_id = store.create(parsed(CEPS[0]))["id"]
    with app.app_context():
        key, item = _overdue_item(store, runner, lookups, batch_id)
        client.delete(*redis_broker.priority_lists(prefix), services(app).deferred.key)

        assert runner.step(batch_id) == "finished"

    (row,) = store.rows(batch_id)
    assert row["state"] == "failed" and row["error"].startswith(
        "its lookup's work was lost: nothing happened"
    )
    assert set(row["sources"].values()) == {"error"}


def test_an_overdue_item_waits_while_a_task_of_its_lookup_is_queued(make_app):
    app = make_app(visibility_timeout=1, batch_item_timeout=2.0)
    store, runner, lookups = (services(app).batches, services(app).batch_runner, services(app).lookups)
    batch_id = store.create(parsed(CEPS[0]))["id"]
    with app.app_context():
        key, item = _overdue_item(store, runner, lookups, batch_id)
        assert sent(app, pipeline.LOOKUP_TASK)  # its task, still queued: owed to it

        assert runner.step(batch_id) == "stepped"

    assert key in store.in_flight(batch_id)  # it waits for the task
    assert lookups.get(item.lookup_id).status != LookupStatus.COMPLETE


def test_kick_if_stalled_sends_one_step_per_stall_and_none_to_a_batch_stepping(app):
    store, runner = services(app).batches, services(app).batch_runner
    batch_id = store.create(parsed(CEPS[0]))["id"]
    finished = store.create(parsed(CPF))["id"]
    with app.app_context():
        assert not runner.kick_if_stalled(batch_id)  # created just now: its first step is due
        stall(app, batch_id)
        assert runner.kick_if_stalled(batch_id)
        assert not runner.kick_if_stalled(batch_id)  # one kick per STALL_SECONDS
        assert not runner.kick_if_stalled(finished) and not runner.kick_if_stalled("no-such-batch")

    assert sent(app, STEP_TASK) == [[batch_id]]
    assert 0 < services(app).redis.ttl(store.key(batch_id, "kicked")) <= STALL_SECONDS


def test_reading_a_stalled_batchs_status_over_the_api_or_the_cli_sends_it_a_step(app):
    """README: a batch with no step for 10 s gets a new one when its status is read."""
    store, runner = services(app).batches, services(app).batch_runner
    batch_id = store.create(parsed(CEPS[0]))["id"]
    stall(app, batch_id)

    response = app.test_client().get(f"/api/batches/{batch_id}")

    assert response.status_code == 200
    with app.app_context():
        assert response.get_json() == runner.status(batch_id)
    assert sent(app, STEP_TASK) == [[batch_id]]

    services(app).redis.delete(store.key(batch_id, "kicked"))  # STALL_SECONDS later
    shown = app.test_cli_runner().invoke(args=["batch", "status", batch_id])

    assert shown.exit_code == 0, shown.output
    assert sent(app, STEP_TASK) == [[batch_id], [batch_id]]


def test_the_health_checks_repair_kicks_every_stalled_batch(app):
    store, runner = services(app).batches, services(app).batch_runner
    stalled, stepping = (store.create(parsed(value))["id"] for value in CEPS[:2])
    store.create(parsed(CPF))  # finished at once: not counted
    stall(app, stalled)
    with app.app_context():
        assert runner.kick_stalled() == 2

    assert sent(app, STEP_TASK) == [[stalled]]  # not `stepping`, whose first step is due


def test_cancel_publishes_the_progress_and_the_end_once_nothing_is_in_flight(app):
    store, runner = services(app).batches, services(app).batch_runner
    idle = store.create(parsed(*CEPS[:2]))["id"]
    busy = store.create(parsed(*CEPS[2:4]))["id"]
    store.claim(busy, 1, time.time(), 0)
    with app.app_context():
        assert runner.cancel(idle) == "cancelled"
        assert runner.cancel(busy) == "cancelled"
        assert runner.cancel("no-such-batch") is None

    assert [kind for kind, _ in events(app, idle)] == ["progress", "complete"]
    (_, progress), (_, end) = events(app, idle)
    assert progress["finished_at"] is None and end["finished_at"] is not None
    assert end["status"] == "cancelled" and end["links"] == batch_links(idle)
    assert [kind for kind, _ in events(app, busy)] == ["progress"]  # its item in flight finishes first
    assert store.status(busy)["finished_at"] is None
