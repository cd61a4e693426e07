"""Lookup records name the cache entries that hold their sources' data instead of copying it.

A record keeps its data for as long as it lives: through a refetch that replaces the entry
(`refresh`), an invalidation, a generation bump and its sweep, and an entry that would expire
first (a shorter TTL).  What GET returns is what a record copying the data returned.  Against a
real Redis: the cache and the lookup store on one prefix, the pipeline on the sandbox.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import orjson
import pytest
import redis

from cache_manager import Cache
from enrich import pipeline
from enrich.identifiers import parse
from enrich.json_encoding import encode_json
from enrich.lookups import Lookup, LookupStatus, LookupStore, SourceResult, SourceState, new_lookup_id
from enrich.task_messages import LookupTask

CNPJ = "11222333000181"
SOURCES = ("brasilapi", "receitaws", "opencnpj")
MARK = "ACME-NAMED-DATA"  # in every answer's data: what must not be copied into a record


def _answer(source: str, version: int = 1) -> dict:
    return {
        "cnpj": CNPJ,
        "razao_social": f"{MARK} LTDA",
        "version": version,
        "situacao_cadastral": "ATIVA",
        "endereco": {
            "cep": "01310100",
            "uf": "SP",
            "municipio": None if source == "opencnpj" else "SAO PAULO",
        },
        "socios": [{"nome": "MARIA", "qualificacao": "Administrador"}],
        "telefone": None if source == "brasilapi" else "(11) 5555-0000",
    }


@pytest.fixture
def cache(settings, redis_client) -> Cache:
    return Cache(redis_client, settings)


@pytest.fixture
def store(settings, redis_client) -> LookupStore:
    return LookupStore(redis_client, settings)


def _cached_lookup(cache: Cache, *, pending: tuple[str, ...] = ()) -> Lookup:
    """A queued lookup whose sources (but `pending`) were answered from the cache, as start_lookup
    makes one."""
    entries = cache.get_many("cnpj", list(SOURCES), CNPJ)
    now = time.time()
    sources = {
        name: pipeline.result_from_cache(entries[name])
        if name not in pending
        else SourceResult(name, SourceState.PENDING)
        for name in SOURCES
    }
    return Lookup(
        id=new_lookup_id(),
        type="cnpj",
        identifier=CNPJ,
        priority=5,
        status=LookupStatus.QUEUED,
        created_at=now,
        deadline_at=now + 15,
        sources=sources,
        tasks={name: uuid.uuid4().hex for name in pending},
    )


def _fill(cache: Cache, version: int = 1) -> None:
    for source in SOURCES:
        cache.set("cnpj", source, CNPJ, _answer(source, version))


def _values(redis_client, key: str) -> bytes:
    return b"".join(redis_client.hgetall(key).values())


def _keys_holding(redis_client, settings, text: str) -> list[bytes]:
    """Every string or hash under the prefix whose value contains `text`."""
    found = []
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        kind = redis_client.type(key)
        value = (
            redis_client.get(key)
            if kind == b"string"
            else _values(redis_client, key)
            if kind == b"hash"
            else b""
        )
        if text.encode() in (value or b""):
            found.append(key)
    return found


# -- naming instead of copying ----------------------------------------------------------------


def test_a_record_names_the_cache_entries_it_was_answered_from_and_reads_their_data(
    cache, store, redis_client
):
    _fill(cache)
    lookup = _cached_lookup(cache, pending=("opencnpj",))
    store.create(lookup)

    stored = _values(redis_client, store.record_key(lookup.id))
    assert MARK.encode() not in stored and b'"ref":' in stored
    read = store.get(lookup.id)
    assert read == lookup and read.to_dict() == lookup.to_dict()
    assert read.sources["brasilapi"].data == _answer("brasilapi")


def test_a_fresh_answer_is_named_through_the_entry_this_process_wrote(cache, store, redis_client):
    lookup = _cached_lookup(cache, pending=SOURCES)
    store.create(lookup)
    data = _answer("receitaws")
    origin = cache.set("cnpj", "receitaws", CNPJ, data)  # the version written
    assert origin is not None and origin.raw == redis_client.get(origin.keys(cache.settings)[0])

    ok = SourceResult("receitaws", SourceState.OK, data=data, elapsed_ms=12.0, attempts=1, origin=origin)
    assert store.set_source(lookup.id, ok) == (True, True, 1, 3)

    assert MARK.encode() not in _values(redis_client, store.record_key(lookup.id))
    assert store.get(lookup.id).sources["receitaws"] == ok


def test_a_record_keeps_its_data_when_naming_its_entries_fails_partway(cache, store, redis_client, settings):
    _fill(cache)
    lookup = _cached_lookup(cache)
    entry = lookup.sources["receitaws"].origin.keys(settings)[0]
    redis_client.delete(entry)
    redis_client.hset(entry, "not", "a string")  # the naming script's GET of it fails (WRONGTYPE)

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.create(lookup)

    read = store.get(lookup.id)  # the sources before it named, the others still carry their data
    assert {name: source.data for name, source in read.sources.items()} == {s: _answer(s) for s in SOURCES}
    assert b'"ref":' in redis_client.hget(store.record_key(lookup.id), "s:brasilapi")


def test_a_record_names_its_entries_after_redis_forgot_the_script(cache, store, redis_client):
    _fill(cache)
    lookup = _cached_lookup(cache)
    redis_client.script_flush()  # a restarted Redis: the naming script's SHA is unknown (NOSCRIPT)
    store.create(lookup)
    assert MARK.encode() not in _values(redis_client, store.record_key(lookup.id))
    assert store.get(lookup.id) == lookup


class _RoundTrips:
    """What reaches Redis: the round trips (each write of commands to a connection) and the calls
    per command (INFO commandstats, the INFO itself left out; it counts the commands the scripts
    call too)."""

    def __init__(self, client, monkeypatch) -> None:
        self.client, self.sent = client, 0
        send = redis.connection.AbstractConnection.send_packed_command

        def counted(connection, command, *args, **kwargs):
            self.sent += 1
            return send(connection, command, *args, **kwargs)

        client.ping()  # the connection's own handshake is not counted
        self.before = self._calls()
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)

    def _calls(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name[len("cmdstat_") :]: value["calls"] for name, value in stats.items()}

    def calls(self) -> dict[str, int]:
        after = self._calls()
        delta = {name: calls - self.before.get(name, 0) for name, calls in after.items() if name != "info"}
        return {name: calls for name, calls in delta.items() if calls}


def test_a_cache_write_and_a_record_naming_its_entries_are_one_round_trip_each(
    cache, store, redis_client, monkeypatch
):
    _fill(cache)
    lookup = _cached_lookup(cache, pending=("opencnpj",))
    cache.set("cnpj", "receitaws", CNPJ, _answer("receitaws"))  # its scripts loaded once
    # The generation, which a write reads unless a live near cache knows it (as it does in service).
    monkeypatch.setattr(cache, "generation", lambda: 0)

    trips = _RoundTrips(redis_client, monkeypatch)
    cache.set("cnpj", "opencnpj", CNPJ, _answer("opencnpj", version=2))
    assert trips.sent == 1
    calls = trips.calls()
    assert calls.get("evalsha") == 1 and "script|exists" not in calls and "publish" in calls

    trips = _RoundTrips(redis_client, monkeypatch)
    store.create(lookup)
    assert trips.sent == 1
    calls = trips.calls()
    assert calls.get("evalsha") == 1 and "script|exists" not in calls and "script|load" not in calls
    assert b'"ref":' in _values(redis_client, store.record_key(lookup.id))


# -- keeping the data for the record's whole life ------------------------------------------------


def _kept_keys(redis_client, settings) -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{settings.key_prefix}:cache:kept:*"))


def _assert_kept_within_the_record_ttl(redis_client, settings, store, lookup_id):
    record_ttl = redis_client.pttl(store.record_key(lookup_id))
    kept = _kept_keys(redis_client, settings)
    assert kept
    for key in kept:  # as long as the record, and never past LOOKUP_RECORD_TTL
        assert record_ttl - 5000 <= redis_client.pttl(key) <= settings.lookup_record_ttl * 1000


def test_a_record_keeps_its_data_when_a_refresh_writes_different_data(cache, store, redis_client, settings):
    _fill(cache, version=1)
    lookup = _cached_lookup(cache)
    store.create(lookup)
    before = encode_json(store.get(lookup.id).to_dict())

    _fill(cache, version=2)  # a refetch (`refresh`) replaces every entry

    assert cache.get("cnpj", "brasilapi", CNPJ).data["version"] == 2
    assert encode_json(store.get(lookup.id).to_dict()) == before
    _assert_kept_within_the_record_ttl(redis_client, settings, store, lookup.id)


@pytest.mark.parametrize("how", ["identifier", "type", "generation"])
def test_a_record_keeps_its_data_when_its_entries_are_invalidated(cache, store, redis_client, settings, how):
    _fill(cache)
    lookup = _cached_lookup(cache)
    store.create(lookup)
    before = encode_json(store.get(lookup.id).to_dict())

    if how == "identifier":
        assert cache.invalidate("cnpj", CNPJ) == 3
    elif how == "type":
        assert cache.invalidate("cnpj") == 3
    else:
        cache.bump_generation()
        assert cache.delete_old_generations() == 3  # beat's sweep of the old generation

    assert cache.get_many("cnpj", list(SOURCES), CNPJ) == {}
    assert encode_json(store.get(lookup.id).to_dict()) == before
    _assert_kept_within_the_record_ttl(redis_client, settings, store, lookup.id)


def test_an_entry_that_would_expire_before_the_record_is_copied_into_it(redis_client, settings):
    # Entries kept 1 h in all, records 2 days: a record cannot name them.
    short = dataclasses.replace(settings, cache_ttl_cnpj=1800, cache_stale_ttl=1800)
    cache, store = Cache(redis_client, short), LookupStore(redis_client, short)
    _fill(cache)
    lookup = _cached_lookup(cache, pending=("opencnpj",))
    store.create(lookup)
    data = _answer("opencnpj")
    origin = cache.set("cnpj", "opencnpj", CNPJ, data)
    store.set_source(lookup.id, SourceResult("opencnpj", SourceState.OK, data=data, origin=origin))

    assert b'"ref":' not in _values(redis_client, store.record_key(lookup.id))
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:cache:*:cnpj:*"):
        redis_client.delete(key)  # expired, as they would be before the record
    read = store.get(lookup.id)
    assert {name: source.data for name, source in read.sources.items()} == {s: _answer(s) for s in SOURCES}


def test_an_entry_replaced_between_its_read_and_the_record_is_copied_into_it(cache, store, redis_client):
    _fill(cache, version=1)
    lookup = _cached_lookup(cache)  # read version 1 ...
    _fill(cache, version=2)  # ... which a refetch replaces before the record is written

    # In the same millisecond on Redis's clock the copy would live exactly as long (named): wait
    # for the next one, a condition on that clock rather than a sleep.
    def redis_ms() -> int:
        seconds, micros = redis_client.time()
        return seconds * 1000 + micros // 1000

    began, deadline = redis_ms(), time.monotonic() + 5
    while redis_ms() <= began:
        assert time.monotonic() < deadline
    store.create(lookup)
    # Its kept copy lives what was left of the entry's TTL, at most LOOKUP_RECORD_TTL: not as long
    # as a record written later, so the record carries the version it was answered from.
    stored = _values(redis_client, store.record_key(lookup.id))
    assert b'"ref":' not in stored and stored.count(MARK.encode()) == len(SOURCES)
    assert {s.data["version"] for s in store.get(lookup.id).sources.values()} == {1}


def test_a_fresh_answer_replaced_before_it_is_recorded_is_named_through_its_kept_copy(
    cache, store, redis_client, settings
):
    lookup = _cached_lookup(cache, pending=SOURCES)
    store.create(lookup)
    record = store.record_key(lookup.id)
    redis_client.pexpire(record, settings.lookup_record_ttl * 1000 - 60_000)  # a minute old
    data = _answer("receitaws", version=1)
    origin = cache.set("cnpj", "receitaws", CNPJ, data)
    cache.set("cnpj", "receitaws", CNPJ, _answer("receitaws", version=2))  # a refetch replaces it
    entry, kept = origin.keys(settings)
    assert redis_client.get(entry) != origin.raw and redis_client.get(kept) == origin.raw

    ok = SourceResult("receitaws", SourceState.OK, data=data, attempts=1, origin=origin)
    assert store.set_source(lookup.id, ok)[0]

    stored = _values(redis_client, record)
    assert MARK.encode() not in stored and f'"ref":"{origin.ref}"'.encode() in stored
    assert store.get(lookup.id).sources["receitaws"].data == data


def test_an_entry_gone_before_the_record_names_it_is_copied(cache, store, redis_client, settings):
    _fill(cache)
    lookup = _cached_lookup(cache)
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:cache:v*"):
        redis_client.delete(key)  # deleted by hand: no kept copy either
    store.create(lookup)
    assert store.get(lookup.id) == lookup
    assert store.get(lookup.id).sources["receitaws"].data == _answer("receitaws")


def test_the_cache_keeps_only_entries_with_data_for_what_was_left_of_their_ttl_at_most_the_record_ttl(
    redis_client, settings
):
    def kept_ttls() -> list[int]:
        return sorted(redis_client.ttl(key) for key in _kept_keys(redis_client, settings))

    capped = dataclasses.replace(settings, lookup_record_ttl=1000)  # entries live 37 days
    cache = Cache(redis_client, capped)
    cache.set("cnpj", "brasilapi", CNPJ, None, found=False)
    cache.set("cnpj", "brasilapi", CNPJ, _answer("brasilapi"))  # a "not found" has nothing to name
    assert kept_ttls() == []
    cache.set("cnpj", "brasilapi", CNPJ, _answer("brasilapi", version=2))
    assert 990 <= kept_ttls()[0] <= 1000

    short = Cache(redis_client, dataclasses.replace(capped, cache_ttl_cep=300, cache_stale_ttl=0))
    short.set("cep", "viacep", "01310100", {"cep": "01310100"})
    assert short.invalidate("cep", "01310100") == 1
    assert 290 <= kept_ttls()[0] <= 300  # what the entry had left


# -- what GET returns ---------------------------------------------------------------------------


def _old_format(store: LookupStore, lookup: Lookup) -> None:
    """The record as the release before wrote it: every source's state and data, the result whole."""
    fields = {
        "type": lookup.type,
        "identifier": lookup.identifier,
        "priority": lookup.priority,
        "status": str(lookup.status),
        "created_at": lookup.created_at,
        "deadline_at": lookup.deadline_at,
        "tasks": orjson.dumps(lookup.tasks),
        "sources": ",".join(lookup.sources),
        "done": lookup.done,
        "total": len(lookup.sources),
        "result": orjson.dumps(lookup.result),
        "completed_at": lookup.completed_at,
        **{f"s:{name}": orjson.dumps(result.to_dict()) for name, result in lookup.sources.items()},
        **{f"settled:{name}": "1" for name, result in lookup.sources.items() if result.settled},
    }
    store.redis.hset(store.record_key(lookup.id), mapping=fields)
    store.redis.expire(store.record_key(lookup.id), store.settings.lookup_record_ttl)


def test_get_returns_byte_for_byte_what_a_record_copying_the_data_returned(cache, store):
    _fill(cache)
    lookup = _cached_lookup(cache, pending=("receitaws",))
    store.create(lookup)
    fresh = {**_answer("receitaws"), "razao_social": "ACME LTDA", "extra": [1, 2.5, None]}
    origin = cache.set("cnpj", "receitaws", CNPJ, fresh)
    store.set_source(
        lookup.id, SourceResult("receitaws", SourceState.OK, data=fresh, elapsed_ms=3.5, origin=origin)
    )
    named = store.get(lookup.id)
    merged = {
        "data": {**_answer("brasilapi"), "telefone": "(11) 5555-0000", "extra": [1, 2.5, None]},
        "checks": [{"name": "active", "status": "pass", "detail": "situação", "code": "x", "params": {}}] * 7,
    }
    assert store.finish(lookup.id, LookupStatus.COMPLETE, merged, named.sources)

    finished = store.get(lookup.id)
    old = dataclasses.replace(finished, id=new_lookup_id())
    _old_format(store, old)
    as_old = store.get(old.id)
    assert encode_json({**finished.to_dict(), "id": None, "links": None}) == encode_json(
        {**as_old.to_dict(), "id": None, "links": None}
    )
    assert finished.result == merged
    stored = store.redis.hget(store.record_key(lookup.id), "result")
    assert len(stored) < len(orjson.dumps(merged)) / 2  # a patch on a named source's data, deflated


def test_the_result_keeps_its_base_when_that_source_is_replaced_later(cache, store):
    _fill(cache)
    lookup = _cached_lookup(cache)
    store.create(lookup)
    merged = {"data": {**_answer("brasilapi"), "telefone": "(11) 5555-0000"}, "checks": []}
    assert store.finish(lookup.id, LookupStatus.COMPLETE, merged, store.get(lookup.id).sources)
    requeued = SourceResult("brasilapi", SourceState.OK, data={"other": True})
    store.set_source(lookup.id, requeued, replace_settled=True)  # a dead letter requeued
    read = store.get(lookup.id)
    assert read.result == merged and read.sources["brasilapi"] == requeued


def test_a_result_that_is_no_patch_of_a_source_is_kept_whole(cache, store):
    _fill(cache)
    lookup = _cached_lookup(cache)
    store.create(lookup)
    sources = store.get(lookup.id).sources
    for data in ({"only": "this"}, None, {**_answer("brasilapi"), "razao_social": True}):
        result = {"data": data, "checks": [{"name": "x"}]}
        other = dataclasses.replace(lookup, id=new_lookup_id())
        store.create(other)
        store.finish(other.id, LookupStatus.PARTIAL, result, sources)
        assert store.get(other.id).result == result


# -- purge, TTLs and the task registry ----------------------------------------------------------


def test_purging_a_type_removes_the_data_its_records_named_with_the_records(
    cache, store, redis_client, settings
):
    _fill(cache, version=1)
    lookup = _cached_lookup(cache)
    store.create(lookup)
    _fill(cache, version=2)  # the version the record names is now a kept copy
    assert _keys_holding(redis_client, settings, MARK)

    def event_key(lookup_id: str) -> str:
        return f"{settings.key_prefix}:events:{lookup_id}"

    removed = cache.purge_type("cnpj") + store.purge_type("cnpj", event_key)  # as beat's cleanup does

    assert removed == 3 + 3 + 1  # entries, kept copies, the record
    assert _keys_holding(redis_client, settings, MARK) == []
    assert store.get(lookup.id) is None


def test_a_source_calls_registry_entry_is_short_and_reads_as_before(store, redis_client):
    lookup = _cached_lookup(Cache(store.redis, store.settings), pending=SOURCES)
    store.create(lookup)
    for source, task_id in lookup.tasks.items():
        assert len(redis_client.get(store.task_key(task_id))) <= 44  # one allocation in Redis
        assert store.task(task_id) == {
            "name": "job_queue.fetch_source",
            "lookup_id": lookup.id,
            "source": source,
        }
    old = {"name": "job_queue.fetch_source", "lookup_id": lookup.id, "source": "brasilapi", "task_id": "t1"}
    redis_client.set(store.task_key("old-entry"), orjson.dumps(old), ex=60)  # written by the release before
    assert store.task("old-entry") == old


# -- through the pipeline -----------------------------------------------------------------------


@pytest.fixture
def app(make_sandbox_app):
    return make_sandbox_app(source_timeout=2.0)


def test_a_lookup_run_through_its_sources_keeps_no_copy_of_their_answers(parts, sandbox):
    cnpj = sandbox.known("cnpj", seed=31)
    lookup, _ = pipeline.start_lookup(parts, parse(cnpj))
    pipeline.run_lookup_calls(parts, LookupTask(lookup.id, "cnpj", cnpj, lookup.priority, lookup.tasks))

    done = parts.lookups.get(lookup.id)
    assert done.status == "complete"
    answers = {name: source.data for name, source in done.sources.items() if source.data}
    assert answers and done.result["data"]
    stored = _values(parts.redis, parts.lookups.record_key(lookup.id))
    for data in answers.values():  # neither an answer nor the merged result is copied
        assert data["razao_social"].encode() not in stored
    complete = [
        data
        for kind, data in ((m.type, orjson.loads(m.data)) for m in parts.events.read_after(lookup.id))
        if kind == "complete"
    ]
    shown = done.to_dict()
    unstamped = {"completed_at": None, "timestamp": None}  # stamped when sent: the event's own
    assert [{**event, **unstamped} for event in complete] == [{**shown, **unstamped}]

    served = sandbox.served("brasilapi")
    again, _ = pipeline.start_lookup(parts, parse(cnpj), refresh=True)  # refetches every source
    pipeline.run_lookup_calls(parts, LookupTask(again.id, "cnpj", cnpj, again.priority, again.tasks))
    assert sandbox.served("brasilapi") == served + 1
    assert parts.lookups.get(lookup.id).to_dict() == shown
