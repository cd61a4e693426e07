"""batches/store.py (with record.py, scripts.py and eta.py): a batch's records in the real Redis, read
and written by the store's functions directly; no worker, nothing sent.  Reading writes nothing."""

from __future__ import annotations

import hashlib
import time

import orjson
import pytest

from enrich.batches import eta
from enrich.batches import input as batch_input
from enrich.batches.record import COUNT_FIELDS, SUMMARY_BYTES, item_key
from enrich.batches.store import InFlight
from enrich.identifiers import parse
from enrich.lookups import Lookup, LookupStatus, SourceResult, SourceState
from enrich.services import services

CEPS = [f"0131{n:04d}" for n in range(10)]
CNPJ = "11.222.333/0001-81"
CPF = "111.444.777-35"


@pytest.fixture
def store(app):
    return services(app).batches


def parsed(*values: str) -> batch_input.ParsedBatch:
    return batch_input.parse_json(list(values), 1000)


def snapshot(client, prefix: str) -> dict:
    """Every key under the test's prefix with its type, value and whether it expires."""
    read = {
        "string": client.get,
        "hash": client.hgetall,
        "list": lambda key: client.lrange(key, 0, -1),
        "set": client.smembers,
        "zset": lambda key: client.zrange(key, 0, -1, withscores=True),
        "stream": client.xrange,
    }
    keys = sorted(client.scan_iter(match=f"{prefix}:*", count=1000))
    return {
        key: (client.type(key).decode(), read[client.type(key).decode()](key), client.ttl(key) > 0)
        for key in keys
    }


def not_found_summary(value: str) -> dict:
    return {
        "state": "not_found",
        "type": "cep",
        "identifier": value,
        "fields": {},
        "sources": {},
        "error": None,
    }


def test_create_writes_the_hash_lines_queue_and_settled_items_and_keeps_only_the_tokens_hash(
    store, redis_client, settings
):
    cached = {item_key(parse(CEPS[1])): not_found_summary(CEPS[1])}
    created = store.create(parsed(CEPS[0], CEPS[1], CEPS[0], CPF, "nonsense"), "list", "198.51.100.7", cached)

    batch_id, token = created["id"], created["cancel_token"]
    stored = redis_client.hgetall(store.key(batch_id))
    assert stored[b"cancel_token_sha256"] == hashlib.sha256(token.encode()).hexdigest().encode()
    assert not any(token.encode() in value for value in stored.values())
    assert created["counts"] == {
        "pending": 1,
        "running": 0,
        "found": 1,  # the CPF, answered from the number
        "not_found": 1,  # the cached CEP
        "partial": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert (created["total"], created["lines"], created["invalid_lines"], created["duplicates"]) == (
        3,
        5,
        1,
        1,
    )
    assert created["cached"] == 1 and created["status"] == "running" and created["finished_at"] is None
    assert "links" not in created  # the routes' business, not the store's
    assert redis_client.lrange(store.key(batch_id, "queue"), 0, -1) == [f"cep:{CEPS[0]}".encode()]
    lines = [orjson.loads(raw) for raw in redis_client.lrange(store.key(batch_id, "lines"), 0, -1)]
    assert [line[2] for line in lines] == [f"cep:{CEPS[0]}", f"cep:{CEPS[1]}", f"cep:{CEPS[0]}", "cpf:0", ""]
    assert lines[3][1] == "***.***.***-35"  # a CPF is kept masked, under a key that is not the number
    assert lines[4][3]  # the reason a line could not be read
    items = redis_client.hgetall(store.key(batch_id, "items"))
    assert set(items) == {f"cep:{CEPS[1]}".encode(), b"cpf:0"}
    for part in ("", "lines", "queue", "items"):
        assert 0 < redis_client.ttl(store.key(batch_id, part or None)) <= settings.batch_retention
    assert redis_client.zscore(store.index_key, batch_id) == pytest.approx(created["created_at"])
    assert redis_client.sismember(store.unfinished_key, batch_id)
    reserved = store.storage.used()["client:198.51.100.7"]
    assert reserved > SUMMARY_BYTES  # the queued item's summary to come is reserved too


def test_a_batch_with_nothing_to_look_up_is_complete_when_created(store, redis_client):
    created = store.create(parsed(CPF, "nonsense"))

    assert created["status"] == "complete" and created["finished_at"] is not None
    assert created["eta_seconds"] == 0.0 and created["done"] == 1
    assert not redis_client.sismember(store.unfinished_key, created["id"])


def test_reading_a_stalled_batch_writes_nothing_and_sends_nothing(app, store, redis_client, settings):
    """status() used to send a step to a batch with no step for 10 s (and cluster_stats() to drop
    expired ids): now every read leaves Redis, broker lists included, exactly as it was."""
    batch_id = store.create(parsed(*CEPS[:4]))["id"]
    store.claim(batch_id, 2, time.time(), 0)  # two in flight, two queued: the ETA reads both
    long_ago = time.time() - 600
    redis_client.hset(store.key(batch_id), mapping={"created_at": long_ago, "stepped_at": long_ago})
    redis_client.sadd(store.unfinished_key, "an-expired-batch")
    assert store.last_step_at(batch_id) == pytest.approx(long_ago)  # stalled: the runner would kick it
    before = snapshot(redis_client, settings.key_prefix)

    with app.app_context():
        status = store.status(batch_id)
        reads = [
            store.exists(batch_id),
            list(store.rows(batch_id)),
            store.cancel_token_matches(batch_id, "not-the-token"),
            store.counts_if_open(batch_id),
            store.in_flight(batch_id),
            store.running_ids(),
            store.cluster_stats(),
            store.unfinished(),
        ]

    assert snapshot(redis_client, settings.key_prefix) == before
    assert status["counts"]["running"] == 2 and status["eta_seconds"] is not None
    assert reads[-2] == {"running": 1, "items_pending": 2, "items_in_flight": 2}  # the expired id not counted


def test_claim_takes_no_more_than_the_cluster_wide_cap_across_batches(store, redis_client):
    first = store.create(parsed(*CEPS[:4]))["id"]
    second = store.create(parsed(*CEPS[4:8]))["id"]
    now = time.time()

    assert len(store.claim(first, 3, now, 0)) == 3
    assert store.claim(second, 3, now, 0) == []  # the cap counts all batches' items in flight
    assert store.status(first)["counts"]["pending"] == 1 and store.status(first)["counts"]["running"] == 3
    assert set(store.in_flight(first).values()) == {InFlight("", str(now), "")}  # claimed, not started
    # Members no step has seen lately (their batch is gone) are dropped before counting.
    assert len(store.claim(second, 3, now + 1, stale_before=now + 0.5)) == 3
    assert redis_client.zcard(store.inflight_key) == 3


def test_an_item_settles_once_and_the_batch_finishes_when_nothing_is_left(store, redis_client):
    batch_id = store.create(parsed(CEPS[0]))["id"]
    (key,) = store.claim(batch_id, 5, time.time(), 0)
    store.mark_started(batch_id, key, "own-id", 12.5, "shared-id")
    assert store.in_flight(batch_id) == {key: InFlight("own-id", "12.5", "shared-id")}
    assert not store.finish_if_done(batch_id)  # one in flight

    assert store.settle(batch_id, key, not_found_summary(CEPS[0]))
    assert not store.settle(batch_id, key, not_found_summary(CEPS[0]))  # a second step's try counts nothing
    assert store.finish_if_done(batch_id) and not store.finish_if_done(batch_id)

    status = store.status(batch_id)
    assert status["status"] == "complete" and status["counts"]["not_found"] == 1 and status["done"] == 1
    assert store.counts_if_open(batch_id) == ("finished", [])
    assert store.last_step_at(batch_id) is None
    assert redis_client.zcard(store.inflight_key) == 0
    assert not redis_client.sismember(store.unfinished_key, batch_id)


def test_cancel_empties_the_queue_and_leaves_the_items_in_flight(store, redis_client):
    batch_id = store.create(parsed(*CEPS[:3]))["id"]
    (key,) = store.claim(batch_id, 1, time.time(), 0)

    assert store.cancel(batch_id) == "cancelled"
    status = store.status(batch_id)
    assert status["counts"]["cancelled"] == 2 and status["counts"]["running"] == 1
    assert status["cancelled_at"] is not None and status["finished_at"] is None
    assert redis_client.llen(store.key(batch_id, "queue")) == 0
    assert store.cancel(batch_id) == "cancelled"  # again: nothing more to cancel
    store.settle(batch_id, key, not_found_summary(CEPS[0]))
    assert store.finish_if_done(batch_id)
    assert store.status(batch_id)["status"] == "cancelled"  # a cancelled batch stays cancelled
    assert store.cancel(store.create(parsed(CPF))["id"]) == "complete"
    assert store.cancel("no-such-batch") is None


def test_only_the_cancel_token_matches(store):
    created = store.create(parsed(CEPS[0]))
    batch_id, token = created["id"], created["cancel_token"]

    assert store.cancel_token_matches(batch_id, token) is True
    assert store.cancel_token_matches(batch_id, token + "x") is False
    assert store.cancel_token_matches(batch_id, None) is False
    assert store.cancel_token_matches("no-such-batch", token) is None
    assert store.cancel_token_matches("x" * 65, token) is None


def test_rows_follow_the_input_lines_with_each_items_state(store):
    cached = {item_key(parse(CEPS[2])): not_found_summary(CEPS[2])}
    batch_id = store.create(parsed(CEPS[0], "nonsense", CEPS[1], CEPS[2], CEPS[0]), cached=cached)["id"]
    claimed = store.claim(batch_id, 1, time.time(), 0)
    store.mark_started(batch_id, claimed[0], "its-lookup", time.time(), None)

    rows = list(store.rows(batch_id))

    assert [row["line"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["state"] for row in rows] == ["running", "invalid", "pending", "not_found", "running"]
    assert rows[0]["lookup_id"] == rows[4]["lookup_id"] == "its-lookup"


def test_status_eta_counts_the_rate_limits_and_the_wait_a_held_call_has_ahead(store, app):
    """ViaCEP and BrasilAPI paced by their rate limits, and a held call's due time the floor."""
    lookups = services(app).lookups
    batch_id = store.create(parsed(*CEPS[:3]))["id"]
    (key,) = store.claim(batch_id, 1, time.time(), 0)
    with app.app_context():
        from enrich import pipeline

        lookup, _ = pipeline.start_lookup(
            services(app), parse(key.partition(":")[2]), pipeline.BATCH_PRIORITY
        )
    store.mark_started(batch_id, key, lookup.id, time.time(), lookup.shared_id)
    due = time.time() + 120
    lookups.set_source(
        lookup.work_id,
        SourceResult("viacep", SourceState.RATE_LIMITED, scheduled_at=due, updated_at=time.time()),
    )

    status = store.status(batch_id)

    pace = eta.rate_limit_pace(["cep"], services(app).sources, services(app).settings.batch_source_wait)
    assert status["rate_limit_per_second"] == pytest.approx(round(pace, 3))
    assert status["eta_seconds"] >= 119  # never less than the held call's wait ahead
    assert status["throughput_per_second"] is None  # no pace sample yet


def test_held_calls_sum_each_items_longest_wait(app):
    lookups, sources = services(app).lookups, services(app).sources
    now = time.time()
    ids = []
    with app.app_context():
        from enrich import pipeline

        for value in CEPS[:2]:
            lookup, _ = pipeline.start_lookup(services(app), parse(value), pipeline.BATCH_PRIORITY)
            ids.append(lookup.work_id)
    lookups.set_source(
        ids[0], SourceResult("viacep", SourceState.RATE_LIMITED, scheduled_at=now + 4, updated_at=now)
    )

    in_flight, given, ahead = eta.held_calls([(ids[0], "cep"), (ids[1], "cep")], sources, lookups)

    assert in_flight == 2 and given == pytest.approx(4, abs=0.01) and 3 < ahead <= 4
    assert eta.held_calls([], sources, lookups) == (0, 0.0, 0.0)


def test_delete_older_than_removes_every_key_its_log_and_its_bytes(store, app, redis_client, settings):
    events = services(app).events
    batch_id = store.create(parsed(CEPS[0], CEPS[1]), client="198.51.100.8")["id"]
    store.claim(batch_id, 1, time.time(), 0)
    for part in ("step", "kicked", "lost-check"):
        redis_client.set(store.key(batch_id, part), 1, ex=60)
    events.publish(store.channel(batch_id), "progress", {"id": batch_id})
    redis_client.sadd(store.unfinished_key, "an-expired-batch")
    kept = store.create(parsed(CEPS[2]))["id"]
    redis_client.zadd(store.index_key, {kept: time.time() + 3600})  # created "later": kept

    assert store.delete_older_than(time.time() + 1, events.stream_key) == 1

    assert not list(redis_client.scan_iter(match=f"{settings.key_prefix}:batch:{batch_id}*"))
    assert not redis_client.exists(events.stream_key(store.channel(batch_id)))
    assert "client:198.51.100.8" not in store.storage.used()
    assert redis_client.smembers(store.unfinished_key) == {kept.encode()}
    assert store.exists(kept)


def test_in_flight_entries_name_the_record_that_does_the_work():
    assert InFlight.parse("own|12.5|shared") == InFlight("own", "12.5", "shared")
    assert InFlight.parse("own|12.5") == InFlight("own", "12.5", "own")
    assert InFlight.parse("|12.5") == InFlight("", "12.5", "")
    assert len(COUNT_FIELDS) == 7


def test_lookup_statuses_and_source_states_read_records_in_one_round_trip(app):
    """The two LookupStore reads the batch code uses instead of the lookups' keys."""
    lookups = services(app).lookups
    with app.app_context():
        from enrich import pipeline

        lookup, _ = pipeline.start_lookup(services(app), parse(CEPS[5]), pipeline.BATCH_PRIORITY)
    answered = Lookup(
        id="answered-id",
        type="cep",
        identifier=CEPS[6],
        priority=5,
        status=LookupStatus.COMPLETE,
        created_at=time.time(),
        deadline_at=time.time(),
        sources={"viacep": SourceResult("viacep", SourceState.NOT_FOUND, cached=True)},
    )
    lookups.create_answered(answered)  # gives it its sealed id (answer_ids)

    assert lookups.statuses([lookup.id, answered.id, "gone"]) == [
        LookupStatus(lookup.status),
        LookupStatus.COMPLETE,
        None,
    ]
    (states,) = lookups.source_states([(lookup.id, ["viacep", "brasilapi", "no-such-source"])])
    assert sorted(state.source for state in states) == ["brasilapi", "viacep"]
