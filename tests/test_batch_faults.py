"""Bulk batches when things go wrong or run short: a killed worker, a scarce quota, Redis down, retention."""

from __future__ import annotations

import dataclasses
import re
import signal
import time

import orjson
import pytest
import requests
from conftest import wait_for
from sse_client import Event, read_all
from test_batches import BATCH_ENV, fast_upstreams  # noqa: F401 - the autouse fixture applies here too

from app import close_app, create_app
from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich import maintenance, redis_broker
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.services import services
from enrich.settings import Settings
from enrich.task_messages import LOOKUP_TASK


def _finished(stack, batch_id: str, timeout: float) -> dict:
    def finished():
        body = stack.get(f"/api/batches/{batch_id}").json()
        return body if body["finished_at"] else None

    return wait_for(finished, timeout, 0.2, f"batch {batch_id} to finish")


def test_a_batch_finishes_after_its_worker_is_killed(make_stack, sandbox):
    """SIGKILL the only worker mid-batch, start another: every item settles, none twice."""
    stack = make_stack(**BATCH_ENV, VISIBILITY_TIMEOUT="5", BATCH_ITEM_TIMEOUT="40")
    stack.start_worker("w1")
    stack.start_web()
    sandbox.control("viacep", latency_ms=100)
    sandbox.control("brasilapi", latency_ms=100)
    ceps = sandbox.identifiers("cep", 150, seed=111)
    batch_id = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10).json()[
        "id"
    ]
    wait_for(lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 10, 30, 0.05, "some items done")
    stack.kill("w1", signal.SIGKILL)
    stack.start_worker("w2")
    body = _finished(stack, batch_id, 120)
    counts = body["counts"]
    assert body["status"] == "complete"
    assert counts["pending"] == counts["running"] == counts["cancelled"] == 0
    assert sum(counts.values()) == 150, counts  # each item counted once
    assert counts["found"] + counts["not_found"] >= 140, counts  # the in-flight ones were redelivered
    rows = stack.get(f"/api/batches/{batch_id}/results", params={"format": "jsonl"}).text.splitlines()
    assert len(rows) == 150


# The defaults' VISIBILITY_TIMEOUT : BATCH_ITEM_TIMEOUT : LOOKUP_DEADLINE (120 : 120 : 15), a tenth.
SCALED_TIMEOUTS = {"VISIBILITY_TIMEOUT": "12", "BATCH_ITEM_TIMEOUT": "12", "LOOKUP_DEADLINE": "1.5"}


def _rows(stack, batch_id: str) -> list[dict]:
    text = stack.get(f"/api/batches/{batch_id}/results", params={"format": "jsonl"}).text
    return [orjson.loads(line) for line in text.splitlines()]


def _row_differs(row: dict, lookup: dict) -> str | None:
    """How a settled row differs from its (complete) lookup, or None when it shows exactly that."""
    sources = {name: result["state"] for name, result in lookup["sources"].items()}
    if lookup["result"]:
        state = "found"
    elif "not_found" in sources.values():
        state = "not_found"
    else:
        state = "failed"
    wanted = {
        "state": state,
        "sources": sources,
        "fields": batch_rows.main_fields(lookup["type"], lookup["result"]),
    }
    shown = {name: row[name] for name in wanted}
    return None if shown == wanted else f"row {shown} but lookup {lookup['status']} {wanted}"


@pytest.mark.timeout(90)
def test_after_a_worker_is_killed_mid_batch_every_row_equals_its_lookup(make_stack, sandbox):
    """Issue 15: with the default timeouts (scaled down together), SIGKILL the only worker mid-batch
    and start another.  An item in flight waits for its lookup's redelivered task instead of settling
    `failed` with its sources `running` first; the batch finishes once every lookup is complete, and
    every row then shows its lookup's final state and sources, and never changes again."""
    began = time.monotonic()
    stack = make_stack(**BATCH_ENV, **SCALED_TIMEOUTS)
    stack.start_worker("w1")
    stack.start_web()
    for name in ("viacep", "brasilapi", "opencnpj", "receitaws"):
        sandbox.control(name, latency_ms=300)
    identifiers = sandbox.identifiers("cep", 200, seed=141) + sandbox.identifiers("cnpj", 100, seed=142)
    created = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": identifiers}, timeout=10)
    batch_id = created.json()["id"]
    wait_for(lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 60, 30, 0.05, "60 items done")
    # Killed between two steps, as it mostly is (a step takes milliseconds): a step killed holding the
    # batch's lock stalls the batch for the lock's 30 s, which is not scaled down with the timeouts.
    client, lock = services(stack.app).redis, services(stack.app).batches.key(batch_id, "step")
    wait_for(lambda: not client.exists(lock), 5, 0.001, "a moment between two steps")
    stack.kill("w1", signal.SIGKILL)
    in_flight = stack.get(f"/api/batches/{batch_id}").json()["counts"]["running"]
    stack.start_worker("w2")

    body = _finished(stack, batch_id, 60)
    rows = _rows(stack, batch_id)
    lookups = {row["lookup_id"]: stack.get(f"/api/lookups/{row['lookup_id']}").json() for row in rows}
    # Finished only once nothing will change: every lookup is complete (a complete one never changes).
    unfinished = {i: (lookup["status"], lookup["sources"]) for i, lookup in lookups.items()}
    unfinished = {i: v for i, v in unfinished.items() if v[0] != "complete"}
    # (Were some not, wait for them, to show how their rows differ from what they became.)
    wait_for(
        lambda: all(stack.get(f"/api/lookups/{i}").json()["status"] == "complete" for i in unfinished),
        30,
        0.5,
        "every lookup to complete",
    )
    lookups.update({i: stack.get(f"/api/lookups/{i}").json() for i in unfinished})
    wrong = {row["line"]: _row_differs(row, lookups[row["lookup_id"]]) for row in rows}
    wrong = {line: why for line, why in wrong.items() if why}
    silent = [row for row in rows if "running" in row["sources"].values() and not row["error"]]
    report = (
        f"{len(wrong)} of {len(rows)} rows differ from their lookups, {len(unfinished)} lookups not complete "
        f"when the batch finished, {len(silent)} rows with a source running and no error "
        f"({in_flight} items in flight at the kill); e.g. {list(wrong.items())[:2]}"
    )
    print(f"\n{report}; {time.monotonic() - began:.1f} s")
    assert body["status"] == "complete" and body["counts"]["running"] == body["counts"]["pending"] == 0
    assert sum(body["counts"].values()) == len(identifiers), body["counts"]  # each item counted once
    assert in_flight > 0, "nothing was in flight at the kill: the test shows nothing"
    assert not wrong and not unfinished and not silent, report
    assert _rows(stack, batch_id) == rows  # nothing changed after the batch finished
    assert stack.get(f"/api/batches/{batch_id}").json()["finished_at"] == body["finished_at"]


LOST = "its lookup's work was lost"


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own (appendonly, as `make run`'s), which it may kill and start again."""
    server = EmbeddedRedis(free_port(), tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


def _answer(stack, path: str, **kwargs) -> requests.Response | None:
    """GET `path`, None while Redis is not back (503) or the web process does not answer."""
    try:
        response = stack.get(path, **kwargs)
    except requests.RequestException:
        return None
    return None if response.status_code == 503 else response


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_after_redis_is_killed_mid_batch_every_row_equals_its_lookup(
    own_redis, sandbox_url, sandbox, tmp_path
):
    """Issue 15, its Redis variant: SIGKILL the Redis (appendonly) mid-batch and start it again on
    the same port and data.  Every row then shows its lookup's final state and sources; only an item
    whose lookup's work Redis really lost (the last writes before the kill: a task, a record) may
    settle otherwise, `failed` or `partial` saying its work was lost, and its lookup never completes
    after all.  No row shows a source `running` with no error, and the batch finishes (`finished_at`)
    only once its rows stop changing."""
    from stack import Stack

    began = time.monotonic()
    stack = Stack(own_redis.url, sandbox_url, tmp_path / "stack", **BATCH_ENV, **SCALED_TIMEOUTS)
    stack.tmp.mkdir()
    try:
        stack.start_worker("w1")
        stack.start_web()
        for name in ("viacep", "brasilapi", "opencnpj", "receitaws"):
            sandbox.control(name, latency_ms=300)
        identifiers = sandbox.identifiers("cep", 200, seed=161) + sandbox.identifiers("cnpj", 100, seed=162)
        created = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": identifiers}, timeout=10)
        batch_id = created.json()["id"]
        wait_for(
            lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 60, 30, 0.05, "60 items done"
        )
        # Killed between two steps, as the worker in the test above: a step cut off holding the
        # batch's lock stalls the batch for the lock's 30 s, which is not scaled down.
        store = services(stack.app).batches
        client, lock = services(stack.app).redis, store.key(batch_id, "step")
        wait_for(lambda: not client.exists(lock), 5, 0.001, "a moment between two steps")
        in_flight = int(client.hget(store.key(batch_id), "n:running"))
        own_redis.kill()
        killed_at = time.monotonic()
        time.sleep(3)  # Redis down: the workers' calls and steps fail meanwhile
        own_redis.start()
        restarted_in = time.monotonic() - killed_at

        def finished():
            response = _answer(stack, f"/api/batches/{batch_id}")
            body = response.json() if response is not None else {}
            return body if body.get("finished_at") else None

        body = wait_for(finished, 60, 0.2, f"batch {batch_id} to finish")
        finished_in = time.monotonic() - killed_at
        rows = _rows(stack, batch_id)

        def lookup_of(lookup_id: str) -> dict | None:
            response = stack.get(f"/api/lookups/{lookup_id}")
            return response.json() if response.status_code == 200 else None  # 404: Redis lost its record

        lookups = {row["lookup_id"]: lookup_of(row["lookup_id"]) for row in rows if row["lookup_id"]}
        unfinished = {i for i, lookup in lookups.items() if lookup and lookup["status"] != "complete"}
        if unfinished:
            # A lookup not complete when the batch finished had its work lost for good: nothing of it
            # is left to run.  Were something left after all, it would complete by then.
            limit = services(stack.app).batch_runner.item_limit
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline and any(
                (lookup_of(i) or {}).get("status") != "complete" for i in unfinished
            ):
                time.sleep(0.5)
            lookups.update({i: lookup_of(i) for i in unfinished})

        def wrong(row: dict) -> str | None:
            lookup = lookups.get(row["lookup_id"]) if row["lookup_id"] else None
            if lookup is not None and lookup["status"] == "complete":
                return _row_differs(row, lookup)
            # Its lookup's work was lost for good (or its record with it).
            settled = row["state"] in ("failed", "partial") and LOST in (row["error"] or "")
            unanswered = {"running", "pending"} & set(row["sources"].values())
            if settled and not unanswered:
                return None
            status = lookup["status"] if lookup else "gone"
            return f"row {row['state']} {row['sources']} {row['error']!r} but lookup {status}"

        differ = {row["line"]: why for row in rows if (why := wrong(row))}
        lost = [row for row in rows if LOST in (row["error"] or "")]
        silent = [row for row in rows if "running" in row["sources"].values() and not row["error"]]
        report = (
            f"{len(differ)} of {len(rows)} rows wrong, {len(lost)} lost for good, {len(silent)} with a source "
            f"running and no error ({in_flight} items in flight at the kill; Redis back in {restarted_in:.1f} s, "
            f"the batch finished {finished_in:.1f} s after the kill); e.g. {list(differ.items())[:2]}"
        )
        print(f"\n{report}; {time.monotonic() - began:.1f} s")
        assert body["status"] == "complete" and body["counts"]["running"] == body["counts"]["pending"] == 0
        assert sum(body["counts"].values()) == len(identifiers), body["counts"]  # each item counted once
        assert len(rows) == len(identifiers)
        assert in_flight > 0, "nothing was in flight at the kill: the test shows nothing"
        assert not differ and not silent, report
        assert _rows(stack, batch_id) == rows  # nothing changed after the batch finished
        assert stack.get(f"/api/batches/{batch_id}").json()["finished_at"] == body["finished_at"]
    finally:
        stack.stop()


def test_an_item_waits_while_a_task_of_its_lookup_is_owed_and_settles_lost_once_none_is(make_app, sandbox):
    """No worker: the test plays the broker's part.  Two items whose sources were left `running` long
    ago (a worker killed mid-call): the one whose task a dead worker still holds unacknowledged waits
    for its redelivery; the one no task of which is left anywhere settles `failed`, saying its work
    was lost, each source an `error` with why (never `running` with no error)."""
    from enrich.lookups import SourceResult, SourceState

    app = make_app(visibility_timeout=1, batch_item_timeout=2.0)  # the limit: max(2, 1 + 2 sweeps of 1 s)
    client, prefix = services(app).redis, services(app).settings.key_prefix
    queues = redis_broker.priority_lists(prefix)
    with app.app_context():
        store, lookups = services(app).batches, services(app).lookups
        runner = services(app).batch_runner
        assert runner.item_limit == 3.0
        batch_id = store.create(batch_input.parse_json(sandbox.identifiers("cep", 2, seed=151), 10))["id"]
        runner._start_items(batch_id)
        running_key = store.key(batch_id, "running")
        items = {k.decode(): v.decode().split("|") for k, v in client.hgetall(running_key).items()}
        (lost_key, (lost_id, _)), (held_key, (held_id, _)) = sorted(items.items())
        long_ago = time.time() - 10
        for key, (lookup_id, _) in items.items():
            client.hset(running_key, key, f"{lookup_id}|{long_ago}")
            for name in lookups.get(lookup_id).sources:
                lookups.set_source(lookup_id, SourceResult(name, SourceState.RUNNING, updated_at=long_ago))
        messages = [raw for queue in queues for raw in client.lrange(queue, 0, -1)]
        held = next(raw for raw in messages if redis_broker.mentions(orjson.loads(raw), held_id))
        client.delete(*queues, services(app).deferred.key)  # the tasks and the deadlines: gone
        client.hset(f"{prefix}:celery:unacked", "tag", b"[" + held + b', "", "celery"]')  # a dead worker's

        runner._collect(batch_id)
        assert set(client.hkeys(running_key)) == {held_key.encode()}  # owed a redelivery: it waits
        lost = orjson.loads(client.hget(store.key(batch_id, "items"), lost_key))
        assert lost["state"] == "failed" and lost["lookup_id"] == lost_id
        assert set(lost["sources"].values()) == {"error"}
        assert re.match(r"its lookup's work was lost: nothing happened to it for \d+ s", lost["error"]), lost
        assert "brasilapi: no answer: its call was lost (running when its work stopped)" in lost["error"]

        client.delete(f"{prefix}:celery:unacked")  # the redelivery lost after all
        client.delete(store.key(batch_id, "lost-check"))  # the next look at the broker, seconds later
        runner._collect(batch_id)
        assert client.hlen(running_key) == 0 and runner._finish_if_done(batch_id)
        assert store.status(batch_id)["counts"]["failed"] == 2
        assert client.zcard(store.inflight_key) == 0


def test_an_item_whose_lookup_never_reached_the_broker_sends_it_again_instead_of_settling_lost(
    make_app, sandbox, monkeypatch
):
    """No worker: the test plays the broker's part.  Redis killed inside a step, between writing an
    item's lookup record (with its single-flight claim and deadline) and sending its task: the step
    after the restart starts the item again, and it joins that lookup, which never runs (its
    deadline sends it again only when it can read the whole backlog, here made too long to read).  Once
    nothing happened to it for `item_limit` and no task of it is left, its task is sent again
    rather than the item given up as lost: the lookup then completes and the item settles from it."""
    from kombu.exceptions import OperationalError

    from enrich import pipeline
    from enrich.identifiers import parse
    from enrich.lookups import SourceResult, SourceState

    app = make_app(visibility_timeout=1, batch_item_timeout=2.0)  # the limit: max(2, 1 + 2 sweeps of 1 s)
    client = services(app).redis
    with app.app_context():
        store, lookups = services(app).batches, services(app).lookups
        runner = services(app).batch_runner
        cep, other = sandbox.identifiers("cep", 2, seed=171)
        batch_id = store.create(batch_input.parse_json([cep], 10))["id"]
        pipeline.start_lookup(
            services(), parse(other), pipeline.BATCH_PRIORITY
        )  # another item's task: a backlog

        def redis_gone(*args, **kwargs):
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        monkeypatch.setattr(pipeline, "send_task", redis_gone)
        with pytest.raises(OperationalError):
            runner._start_items(batch_id)  # the record is written, its task is not sent
        monkeypatch.undo()
        running_key = store.key(batch_id, "running")
        ((key, entry),) = client.hgetall(running_key).items()
        assert entry.startswith(b"|")  # claimed, not started
        orphan_id = client.get(lookups.inflight_key("cep", parse(cep).value)).decode()
        queues = redis_broker.priority_lists(services(app).settings.key_prefix)

        def queued_naming(lookup_id: str) -> list[dict]:
            messages = [orjson.loads(raw) for queue in queues for raw in client.lrange(queue, 0, -1)]
            return [message for message in messages if redis_broker.mentions(message, lookup_id)]

        assert not queued_naming(orphan_id)
        # Its deadline: `partial`, and not sent again: the backlog is more than it reads (made so).
        client.delete(services(app).deferred.key)  # taken by the dispatcher
        monkeypatch.setattr(redis_broker, "SCAN_MAX", 0)
        assert pipeline.finalize(services(), orphan_id, at_deadline=True) == "partial"
        monkeypatch.undo()
        assert not queued_naming(orphan_id)

        runner._collect(batch_id)  # the item starts again: it joins the lookup that never ran
        lookup_id, _, shared_id = client.hget(running_key, key).decode().split("|")
        assert shared_id == orphan_id and lookup_id != orphan_id
        client.hset(running_key, key, f"{lookup_id}|{time.time() - 10}|{shared_id}")  # long ago

        runner._collect(batch_id)
        assert client.hexists(running_key, key), "the item settled as lost though its lookup never ran"
        (message,) = queued_naming(orphan_id)  # its task, sent again
        assert message["headers"]["task"] == LOOKUP_TASK
        runner._collect(batch_id)
        assert len(queued_naming(orphan_id)) == 1  # sent once: now a task of it is owed

        orphan = lookups.get(orphan_id)
        args, _, _ = orjson.loads(redis_broker.message_text(message))
        assert args == [orphan_id, "cep", orphan.identifier, pipeline.BATCH_PRIORITY, orphan.tasks]
        for name in orphan.sources:  # the worker's part: the sources answer
            lookups.set_source(orphan_id, SourceResult(name, SourceState.NOT_FOUND, updated_at=time.time()))
        assert pipeline.finalize(services(), orphan_id) == "complete"
        runner._collect(batch_id)
        (row,) = store.rows(batch_id)
        assert row["lookup_id"] == lookup_id and row["state"] == "not_found", row
        assert _row_differs(row, orjson.loads(orjson.dumps(lookups.get(lookup_id).to_dict()))) is None


def test_batch_calls_leave_the_interactive_reserve_to_people(make_stack, sandbox):
    """ViaCEP at one call a second and a batch that wants far more: the batch takes only the tokens
    above the reserve (and skips ViaCEP past BATCH_SOURCE_WAIT), and a person's lookup meanwhile
    gets its ViaCEP call at once."""
    env = {**BATCH_ENV, "RATE_LIMIT_VIACEP": "60", "BATCH_TOKEN_RESERVE": "2", "BATCH_SOURCE_WAIT": "2"}
    stack = make_stack(**env)
    stack.start_worker("w1")
    stack.start_web()
    ceps = sandbox.identifiers("cep", 80, seed=121)
    people = sandbox.identifiers("cep", 4, seed=122)
    created = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10).json()
    batch_id = created["id"]
    wait_for(
        lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 8, 30, 0.05, "the batch under way"
    )

    def viacep_tokens() -> float:
        return services(stack.app).rate_limiter.tokens("viacep")

    for cep in people:
        lookup = stack.wait_status(stack.post_lookup(cep).json()["id"], timeout=10)
        viacep = lookup["sources"]["viacep"]
        assert viacep["state"] in ("ok", "not_found") and viacep["attempts"] == 1, viacep
        events = read_all(f"{stack.web_url}/api/lookups/{lookup['id']}/events")
        states = [
            e.json["state"]
            for e in events
            if isinstance(e, Event) and e.type == "source" and e.json["source"] == "viacep"
        ]
        assert "rate_limited" not in states, states  # it never waited for a token
        assert lookup["completed_at"] - lookup["created_at"] < 2.0
        # The next person comes once the reserve is whole again (people do not come 4 a second).
        wait_for(lambda: viacep_tokens() >= 2, 5, 0.05, "the reserve to refill")
    cancel = {"X-Cancel-Token": created["cancel_token"]}
    cancelled = requests.delete(f"{stack.web_url}/api/batches/{batch_id}", headers=cancel, timeout=10)
    assert cancelled.status_code in (200, 409), cancelled.text  # 409: it finished first
    body = _finished(stack, batch_id, 60)
    rows = [
        orjson.loads(line)
        for line in stack.get(body["links"]["results"], params={"format": "jsonl"}).text.splitlines()
    ]
    skipped = [row for row in rows if row["sources"].get("viacep") == "rate_limited"]
    assert skipped, "the batch never ran short of ViaCEP tokens: the test shows nothing"
    assert all(row["state"] in ("found", "not_found", "cancelled") for row in rows)  # BrasilAPI answered


def test_a_held_batch_call_never_waits_past_batch_source_wait(make_stack, sandbox):
    """A batch call held for ReceitaWS's token, then paced by the log of starts (the second and the
    minute) gives up BATCH_SOURCE_WAIT after it was first held, whatever it waits for: the source
    settles `rate_limited`, the item from the others.  One paced within the wait runs after it, and
    the batch's ETA meanwhile counts the wait (it said 0 s while the item waited)."""
    from enrich import redis_store

    limit = 3.0  # BATCH_SOURCE_WAIT, scaled down
    margin = 1.0  # the dispatcher's poll, the broker, a busy machine
    stack = make_stack(**BATCH_ENV, BATCH_SOURCE_WAIT=str(limit))
    stack.start_worker("w1")
    stack.start_web()
    client, settings = services(stack.app).redis, stack.settings
    limiter = services(stack.app).rate_limiter

    def receitaws(token_in: float, room_in: float) -> None:
        """ReceitaWS's next token above the reserve `token_in` s away, and a start in its log that
        leaves a batch call no room in the minute for `room_in` s (a batch's share at 2.85 a minute
        and a reserve of 2 is one start a minute)."""
        limiter.reset("receitaws")
        seconds, micros = client.time()
        now = seconds + micros / 1e6
        tokens = limiter.capacity("receitaws") - token_in * settings.sources["receitaws"].rate_per_minute / 60
        bucket = redis_store.key(settings, "ratelimit", "receitaws")
        client.hset(bucket, mapping={"tokens": tokens, "ts": now})
        starts = redis_store.key(settings, "ratelimit", "receitaws", "starts")
        client.zadd(starts, {"an earlier call": now - 60 + room_in})

    def receitaws_of(batch_id: str) -> tuple[dict, dict] | None:
        """(the item's lookup, its ReceitaWS state) while the batch's one item is in flight."""
        running = client.hvals(services(stack.app).batches.key(batch_id, "running"))
        lookup_id = running[0].decode().partition("|")[0] if running else ""
        lookup = stack.get(f"/api/lookups/{lookup_id}").json() if lookup_id else None
        return (lookup, lookup["sources"]["receitaws"]) if lookup else None

    def item_after(batch_id: str) -> tuple[dict, dict, dict]:
        """(the item's result row, its lookup, its ReceitaWS state) once the batch finished."""
        body = _finished(stack, batch_id, 30)
        results = stack.get(body["links"]["results"], params={"format": "jsonl"}).text.splitlines()
        (row,) = [orjson.loads(line) for line in results]
        lookup = stack.get(f"/api/lookups/{row['lookup_id']}").json()
        return row, lookup, lookup["sources"]["receitaws"]

    def post_batch(seed: int) -> str:
        identifiers = [sandbox.known("cnpj", seed=seed)]
        created = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": identifiers}, timeout=10)
        return created.json()["id"]

    # Held 1 s for the token, then the log of starts has no room for another 7 s: it gives up at ~1 s.
    receitaws(token_in=1.0, room_in=8.0)
    row, lookup, call = item_after(post_batch(141))
    assert row["state"] == "found" and row["sources"]["receitaws"] == "rate_limited", row
    assert call["state"] == "rate_limited" and call["scheduled_at"] is None, call
    assert "skipped: the source's tokens are kept for interactive lookups" in call["error"], call
    assert call["updated_at"] - lookup["created_at"] <= limit + margin, (call, lookup["created_at"])

    # Paced 2.5 s (2 s, and the minute's window widened by half a second: see rate_limiter), within
    # the wait: it waits, the ETA says so, then it runs.
    receitaws(token_in=0.0, room_in=2.0)
    batch_id = post_batch(142)

    def held() -> tuple[dict, dict] | None:
        found = receitaws_of(batch_id)
        return found if found and found[1]["state"] == "rate_limited" and found[1]["scheduled_at"] else None

    _, call = wait_for(held, 10, 0.05, "the batch's ReceitaWS call to be held")
    eta = stack.get(f"/api/batches/{batch_id}").json()["eta_seconds"]
    still_held = call["scheduled_at"] - time.time()
    assert still_held > 0, "the call ran before the status was read: the test shows nothing"
    assert eta is not None and eta >= still_held - 0.1, (eta, still_held)
    row, lookup, call = item_after(batch_id)
    assert row["state"] == "found" and row["sources"]["receitaws"] == "ok", row
    assert call["updated_at"] - lookup["created_at"] <= limit + margin, (call, lookup["created_at"])


def test_with_redis_down_batch_requests_get_a_503():
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=0.2)
    app = create_app(settings)
    try:
        client = app.test_client()
        created = client.post("/api/batches", json={"identifiers": ["01310100"]})
        assert created.status_code == 503 and created.get_json()["error"] == "unavailable"
        assert client.get("/api/batches/some-id").status_code == 503
        assert client.delete("/api/batches/some-id").status_code == 503
    finally:
        close_app(app)


def test_cleanup_deletes_batches_past_their_retention(settings, redis_client):
    app = create_app(dataclasses.replace(settings, batch_retention=0.0))
    try:
        with app.app_context():
            store = services(app).batches
            parsed = batch_input.parse_json(["01310100", "bad"], 10)
            batch_id = store.create(parsed)["id"]
            assert store.status(batch_id) is not None
            report = maintenance.cleanup(services())
            assert report["removed"]["batches"] == 1
            assert store.status(batch_id) is None
            assert not list(redis_client.scan_iter(match=f"{settings.key_prefix}:batch:{batch_id}*"))
    finally:
        close_app(app)


@pytest.mark.parametrize("reserve", [0, 2])
def test_profiles_and_defaults_of_the_batch_settings(reserve):
    settings = Settings.from_env({"BATCH_TOKEN_RESERVE": str(reserve)})
    assert settings.batch_token_reserve == reserve
    assert Settings.from_env({}).batch_max_rows == 10_000
    assert (
        Settings.from_env({"PROFILE": "high-load"}).batch_concurrency
        > Settings.from_env({}).batch_concurrency
    )


def test_a_person_does_not_join_a_batch_items_lookup_but_a_batch_item_joins_theirs(app, sandbox):
    from enrich import pipeline
    from enrich.identifiers import parse

    first, second = (parse(value) for value in sandbox.identifiers("cep", 2, seed=131))
    with app.app_context():  # no worker: the lookups stay running
        item, _ = pipeline.start_lookup(services(), first, pipeline.BATCH_PRIORITY)
        person, created = pipeline.start_lookup(services(), first, 5)
        assert created and person.id != item.id  # the person's own lookup, at their priority
        again, created = pipeline.start_lookup(services(), first, pipeline.BATCH_PRIORITY)
        # Batch items still share one lookup's work, each under an id of its own.
        assert not created and again.work_id == item.id and again.id != item.id

        someone, _ = pipeline.start_lookup(services(), second, 5)
        rider, created = pipeline.start_lookup(services(), second, pipeline.BATCH_PRIORITY)
        assert not created and rider.work_id == someone.id and rider.id != someone.id
