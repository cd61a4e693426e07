"""The lookup store against a real Redis: records, source states, finishing, single flight, aliases, answers, TTLs."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid

import orjson
import pytest
import redis

from devstack.embedded_redis import free_port
from enrich import redis_store
from enrich.lookups import (
    FINAL_STATES,
    Lookup,
    LookupStatus,
    LookupStore,
    SourceResult,
    SourceState,
    alias_head,
    new_lookup_id,
)
from enrich.settings import Settings

CNPJ = "11222333000181"
COMPANY = {"cnpj": CNPJ, "razao_social": "ACME LTDA", "situacao_cadastral": "ATIVA"}
STATUS_HISTORY = ":history:"  # the store bumps status-history counters too; those keys are not its own


@pytest.fixture
def store(settings, redis_client) -> LookupStore:
    return LookupStore(redis_client, settings)


def _lookup(
    sources: dict[str, SourceResult] | None = None,
    identifier_type: str = "cnpj",
    identifier: str = CNPJ,
    created_at: float | None = None,
    **changes,
) -> Lookup:
    """A queued lookup with two pending sources, each with a call id of its own."""
    now = time.time() if created_at is None else created_at
    if sources is None:
        sources = {name: SourceResult(name, SourceState.PENDING) for name in ("brasilapi", "receitaws")}
    values = dict(
        id=new_lookup_id(),
        type=identifier_type,
        identifier=identifier,
        priority=7,
        status=LookupStatus.QUEUED,
        created_at=now,
        deadline_at=now + 15,
        sources=sources,
        tasks={name: uuid.uuid4().hex for name in sources if not sources[name].settled},
    )
    return Lookup(**{**values, **changes})


def _answered(identifier_type: str = "cep", identifier: str = "01310100") -> Lookup:
    """A lookup answered whole from the cache, ready for `create_answered`."""
    now = time.time()
    data = {"cep": identifier, "localidade": "São Paulo", "logradouro": "Avenida <Paulista> & co"}
    return Lookup(
        id=new_lookup_id(),
        type=identifier_type,
        identifier=identifier,
        priority=5,
        status=LookupStatus.COMPLETE,
        created_at=now,
        deadline_at=now + 15,
        sources={"viacep": SourceResult("viacep", SourceState.OK, data=data, cached=True, elapsed_ms=0.4)},
        result={"data": data, "checks": [{"name": "cep_exists", "ok": True}]},
        completed_at=now,
    )


def _own_keys(client: redis.Redis, settings: Settings) -> set[str]:
    """Every key under the test's prefix but the status history's buckets."""
    keys = (key.decode() for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000))
    return {key for key in keys if STATUS_HISTORY not in key}


# -- values --------------------------------------------------------------------------------


def test_new_lookup_ids_are_url_safe_128_bit_distinct_and_never_start_with_a_dash():
    ids = [new_lookup_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for lookup_id in ids:
        # 16 random bytes in unpadded base64url are 22 characters.
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", lookup_id), lookup_id
        assert not lookup_id.startswith("-")


def test_a_source_is_settled_in_a_final_state_or_rate_limited_with_no_run_scheduled():
    for state in SourceState:
        assert SourceResult("viacep", state).settled == (state in FINAL_STATES or state == "rate_limited")
    assert not SourceResult("viacep", SourceState.RATE_LIMITED, scheduled_at=time.time() + 5).settled
    assert not SourceResult("viacep", SourceState.RETRYING, attempts=2).settled


def test_a_source_result_round_trips_through_its_dict_and_rejects_an_unknown_state():
    result = SourceResult(
        "receitaws", SourceState.STALE, data=COMPANY, cached=True, stale=True, elapsed_ms=12.5, attempts=3
    )
    as_dict = result.to_dict()
    assert as_dict["state"] == "stale" and isinstance(as_dict["state"], str)
    assert SourceResult.from_dict(orjson.loads(orjson.dumps(as_dict))) == result
    with pytest.raises(ValueError):
        SourceResult.from_dict({**as_dict, "state": "exploded"})


def test_lookup_to_dict_counts_settled_sources_and_carries_result_checks_and_links():
    lookup = _lookup(
        sources={
            "brasilapi": SourceResult("brasilapi", SourceState.OK, data=COMPANY, cached=True),
            "receitaws": SourceResult("receitaws", SourceState.RUNNING),
        },
        result={"data": {"razao_social": "ACME LTDA"}, "checks": [{"name": "active", "ok": True}]},
    )
    body = lookup.to_dict()
    assert body["progress"] == {"done": 1, "total": 2}
    assert body["cached"] is False  # one source still runs upstream
    assert body["result"] == {"razao_social": "ACME LTDA"}
    assert body["checks"] == [{"name": "active", "ok": True}]
    assert body["links"] == {
        "self": f"/api/lookups/{lookup.id}",
        "events": f"/api/lookups/{lookup.id}/events",
    }
    assert body["status"] == "queued" and body["sources"]["receitaws"]["state"] == "running"
    assert set(body) == {*lookup.head(), "cached", "progress", "sources", "tasks", "result", "checks"}


def test_a_lookup_without_an_id_shows_a_null_id_and_no_links_and_no_sources_is_not_cached():
    body = _lookup(id="", sources={}).to_dict()
    assert body["id"] is None and body["links"] == {}
    assert body["cached"] is False and body["progress"] == {"done": 0, "total": 0}
    assert body["result"] is None and body["checks"] == []


def test_alias_head_puts_the_joined_requests_identity_on_a_shared_event():
    shared = _lookup()
    joined = dataclasses.replace(
        shared, id="joined-id", priority=2, created_at=1.0, deadline_at=16.0, tasks={"brasilapi": "t"}
    )
    event = {**shared.head(), "status": "complete", "result": {"a": 1}}
    seen = alias_head(event, joined)
    assert seen["id"] == "joined-id" and seen["priority"] == 2 and seen["tasks"] == {"brasilapi": "t"}
    assert (seen["created_at"], seen["deadline_at"]) == (1.0, 16.0)
    assert seen["links"]["self"] == "/api/lookups/joined-id"
    assert seen["result"] == {"a": 1} and seen["status"] == "complete"
    assert shared.id not in orjson.dumps(seen).decode()


# -- records -------------------------------------------------------------------------------


@pytest.mark.parametrize("finished", [False, True], ids=["queued", "complete-with-result"])
def test_a_created_lookup_reads_back_with_every_field(store, redis_client, finished):
    sources = {
        "brasilapi": SourceResult(
            "brasilapi", SourceState.OK, data=COMPANY, cached=True, elapsed_ms=3.25, updated_at=1.5
        ),
        "receitaws": SourceResult("receitaws", SourceState.PENDING),
        "opencnpj": SourceResult("opencnpj", SourceState.RATE_LIMITED, scheduled_at=time.time() + 30),
    }
    extra = {}
    if finished:
        extra = dict(
            status=LookupStatus.COMPLETE,
            result={"data": {"razao_social": "ACME"}, "checks": [{"name": "x", "ok": False}]},
            completed_at=time.time() + 1,
        )
    lookup = _lookup(sources=sources, **extra)
    assert store.create(lookup) is None
    read = store.get(lookup.id)
    assert read == lookup
    assert read.to_dict() == lookup.to_dict()
    assert read.shared_id is None and read.work_id == lookup.id
    assert store.unsettled(lookup.id, list(sources)) == ["receitaws", "opencnpj"]
    assert store.is_settled(lookup.id, "brasilapi") and not store.is_settled(lookup.id, "receitaws")
    index = f"{store.settings.key_prefix}:lookups"
    assert redis_client.zscore(index, lookup.id) == lookup.created_at


def test_reading_an_unknown_or_odd_id_returns_none(store):
    store.create(_lookup())
    for unknown in (new_lookup_id(), "", "*", "a:b", "lookup", "../x", "é"):
        assert store.get(unknown) is None
        assert store.task(unknown) is None


def test_create_registers_each_call_id_and_register_task_adds_more(store, redis_client, settings):
    lookup = _lookup()
    store.create(lookup)
    for source, task_id in lookup.tasks.items():
        assert store.task(task_id) == {
            "name": "job_queue.fetch_source",
            "lookup_id": lookup.id,
            "source": source,
        }
    store.register_task("finalize-1", "job_queue.finalize_lookup", lookup.id)
    store.register_task("beat-1", "job_queue.cleanup", None)
    assert store.task("finalize-1") == {
        "name": "job_queue.finalize_lookup",
        "lookup_id": lookup.id,
        "source": None,
    }
    assert store.task("beat-1")["lookup_id"] is None
    assert 0 < redis_client.ttl(store.task_key("beat-1")) <= settings.lookup_record_ttl
    assert store.task(uuid.uuid4().hex) is None


def test_the_callers_commands_ride_in_the_create_round_trip(store, redis_client):
    extra_key = redis_store.key(store.settings, "deferred-test")
    seen = []

    def also(pipe):
        seen.append(pipe)
        pipe.set(extra_key, b"queued", ex=60)

    lookup = _lookup()
    store.create(lookup, also=also)
    assert len(seen) == 1 and isinstance(seen[0], redis.client.Pipeline)
    assert redis_client.get(extra_key) == b"queued"
    assert store.get(lookup.id) is not None


def test_discard_removes_the_record_its_call_ids_and_its_index_entry(store, redis_client):
    kept, dropped = _lookup(), _lookup()
    store.create(kept)
    store.create(dropped)
    store.discard(dropped)
    assert store.get(dropped.id) is None
    assert all(store.task(task_id) is None for task_id in dropped.tasks.values())
    index = f"{store.settings.key_prefix}:lookups"
    assert redis_client.zscore(index, dropped.id) is None
    assert store.get(kept.id) == kept and redis_client.zscore(index, kept.id) is not None


# -- source states -------------------------------------------------------------------------


def test_a_source_goes_pending_running_ok_and_the_lookup_from_queued_to_running(store):
    lookup = _lookup()
    store.create(lookup)
    assert store.set_source(lookup.id, SourceResult("brasilapi", SourceState.RUNNING, attempts=1)) == (
        True,
        False,
        0,
        2,
    )
    read = store.get(lookup.id)
    assert read.status == LookupStatus.RUNNING
    assert read.sources["brasilapi"].state == SourceState.RUNNING and read.done == 0
    ok = SourceResult("brasilapi", SourceState.OK, data=COMPANY, elapsed_ms=81.0, attempts=1, updated_at=2.0)
    assert store.set_source(lookup.id, ok) == (True, True, 1, 2)
    read = store.get(lookup.id)
    assert read.sources["brasilapi"] == ok and read.sources["receitaws"].state == SourceState.PENDING
    assert read.done == 1 and store.unsettled(lookup.id, ["brasilapi", "receitaws"]) == ["receitaws"]


def test_a_settled_source_keeps_its_first_answer_when_a_redelivered_task_reports_again(store):
    lookup = _lookup()
    store.create(lookup)
    first = SourceResult("receitaws", SourceState.NOT_FOUND)
    assert store.set_source(lookup.id, first) == (True, True, 1, 2)
    again = SourceResult("receitaws", SourceState.OK, data=COMPANY)
    assert store.set_source(lookup.id, again) == (False, False, 1, 2)
    assert store.set_source(lookup.id, SourceResult("receitaws", SourceState.RUNNING)) == (False, False, 1, 2)
    assert store.get(lookup.id).sources["receitaws"] == first


def test_replace_settled_overwrites_a_settled_source_without_counting_it_twice(store):
    lookup = _lookup()
    store.create(lookup)
    store.set_source(lookup.id, SourceResult("brasilapi", SourceState.ERROR, error="timeout", attempts=4))
    requeued = SourceResult("brasilapi", SourceState.OK, data=COMPANY, attempts=1)
    assert store.set_source(lookup.id, requeued, replace_settled=True) == (True, False, 1, 2)
    read = store.get(lookup.id)
    assert read.sources["brasilapi"] == requeued and read.done == 1


def test_error_settles_with_its_reason_and_a_scheduled_rate_limited_call_stays_unsettled(store):
    lookup = _lookup()
    store.create(lookup)
    error = SourceResult("brasilapi", SourceState.ERROR, error="upstream 503 after 3 retries", attempts=4)
    waiting = SourceResult("receitaws", SourceState.RATE_LIMITED, scheduled_at=time.time() + 20)
    assert store.set_source(lookup.id, error)[:3] == (True, True, 1)
    assert store.set_source(lookup.id, waiting)[:3] == (True, False, 1)
    read = store.get(lookup.id)
    assert read.sources["brasilapi"].error == "upstream 503 after 3 retries"
    assert read.sources["receitaws"].scheduled_at == waiting.scheduled_at
    assert store.unsettled(lookup.id, ["brasilapi", "receitaws"]) == ["receitaws"]
    given_up = SourceResult("receitaws", SourceState.RATE_LIMITED, error="no token in the horizon")
    assert store.set_source(lookup.id, given_up) == (True, True, 2, 2)


def test_writes_to_an_unknown_lookup_change_nothing_and_it_has_nothing_to_call(store, redis_client):
    before = _own_keys(redis_client, store.settings)
    unknown = new_lookup_id()
    assert store.set_source(unknown, SourceResult("viacep", SourceState.OK, data={})) == (
        False,
        False,
        -1,
        -1,
    )
    assert store.finish(unknown, LookupStatus.COMPLETE, {"data": None, "checks": []}) is False
    assert _own_keys(redis_client, store.settings) == before
    assert store.get(unknown) is None
    assert store.unsettled(unknown, ["viacep"]) == []
    assert not store.is_settled(unknown, "viacep")


# -- finishing -----------------------------------------------------------------------------


def test_complete_records_the_status_the_merged_result_and_the_completion_time(store):
    lookup = _lookup()
    store.create(lookup)
    merged = {"data": {"razao_social": "ACME LTDA"}, "checks": [{"name": "active", "ok": True}]}
    before = time.time()
    assert store.finish(lookup.id, LookupStatus.COMPLETE, merged) is True
    read = store.get(lookup.id)
    assert read.status == LookupStatus.COMPLETE and read.result == merged
    assert before <= read.completed_at <= time.time()
    body = read.to_dict()
    assert body["result"] == merged["data"] and body["checks"] == merged["checks"]


def test_a_lookup_completes_only_once(store):
    lookup = _lookup()
    store.create(lookup)
    assert store.finish(lookup.id, LookupStatus.COMPLETE, {"data": {"n": 1}, "checks": []})
    completed_at = store.get(lookup.id).completed_at
    assert not store.finish(lookup.id, LookupStatus.COMPLETE, {"data": {"n": 2}, "checks": []})
    assert not store.finish(lookup.id, LookupStatus.PARTIAL, {"data": {"n": 3}, "checks": []})
    read = store.get(lookup.id)
    assert read.result == {"data": {"n": 1}, "checks": []} and read.completed_at == completed_at


def test_partial_happens_once_from_queued_or_running_and_the_lookup_can_complete_later(store):
    lookup = _lookup()
    store.create(lookup)
    assert store.finish(lookup.id, LookupStatus.PARTIAL, {"data": {"n": 1}, "checks": []})
    read = store.get(lookup.id)
    assert read.status == LookupStatus.PARTIAL and read.completed_at is None
    assert not store.finish(lookup.id, LookupStatus.PARTIAL, {"data": {"n": 2}, "checks": []})
    # A deferred call that runs after the deadline still records its answer.
    assert store.set_source(lookup.id, SourceResult("brasilapi", SourceState.OK, data=COMPANY))[0]
    assert store.get(lookup.id).status == LookupStatus.PARTIAL
    assert store.finish(lookup.id, LookupStatus.COMPLETE, {"data": {"n": 3}, "checks": []})
    read = store.get(lookup.id)
    assert read.status == LookupStatus.COMPLETE and read.result["data"] == {"n": 3}
    assert read.completed_at is not None


# -- single flight -------------------------------------------------------------------------


def test_create_with_claim_takes_the_single_flight_and_a_second_one_is_told_the_running_id(
    store, redis_client, settings
):
    first, second = _lookup(), _lookup()
    assert store.create(first, claim=True) is None
    key = store.inflight_key("cnpj", CNPJ)
    assert redis_client.get(key) == first.id.encode()
    assert store.create(second, claim=True) == first.id
    assert redis_client.get(key) == first.id.encode()
    assert store.claim_inflight("cnpj", CNPJ, new_lookup_id()) == first.id
    # Another identifier or type is another flight.
    assert store.create(_lookup(identifier="11444777000161"), claim=True) is None
    assert store.create(_lookup(identifier_type="cep", identifier=CNPJ), claim=True) is None


@pytest.mark.parametrize("how", ["complete", "expired"])
def test_a_claim_naming_a_complete_or_expired_record_is_taken_over(store, redis_client, how):
    first, second = _lookup(), _lookup()
    store.create(first, claim=True)
    if how == "complete":
        store.finish(first.id, LookupStatus.COMPLETE, {"data": None, "checks": []})
    else:
        redis_client.delete(store.record_key(first.id))
    assert store.create(second, claim=True) is None
    assert redis_client.get(store.inflight_key("cnpj", CNPJ)) == second.id.encode()


def test_a_takeover_never_deletes_a_claim_another_request_took_meanwhile(store, redis_client, monkeypatch):
    """Two requests both see a finished lookup's claim; the one that takes it over first must keep
    it: the other's takeover deletes the claim only if it still names the finished lookup."""
    finished, racing, late = _lookup(), _lookup(), _lookup()
    store.create(finished, claim=True)
    store.finish(finished.id, LookupStatus.COMPLETE, {"data": None, "checks": []})
    store.create(racing)  # the other request's record, not yet its claim
    key = store.inflight_key("cnpj", CNPJ)
    real_hget = redis_client.hget

    def hget_while_the_other_takes_over(name, field):
        answer = real_hget(name, field)
        if name == store.record_key(finished.id):  # between reading the claim and replacing it
            redis_client.set(key, racing.id)
        return answer

    monkeypatch.setattr(store.redis, "hget", hget_while_the_other_takes_over)
    assert store.create(late, claim=True) == racing.id  # it joins the lookup that won the takeover
    assert redis_client.get(key) == racing.id.encode()


def test_a_source_the_record_does_not_list_is_not_applied(store):
    lookup = _lookup()
    store.create(lookup)
    applied, newly, done, total = store.set_source(lookup.id, SourceResult("viacep", SourceState.OK))
    assert (applied, newly, done, total) == (False, False, 0, 2)
    assert "viacep" not in store.get(lookup.id).sources


@pytest.mark.parametrize("status", [LookupStatus.QUEUED, LookupStatus.RUNNING])
def test_a_lookup_finishes_only_partial_or_complete(store, status):
    lookup = _lookup()
    store.create(lookup)
    with pytest.raises(ValueError):
        store.finish(lookup.id, status, {"data": None, "checks": []})
    assert store.get(lookup.id).status == LookupStatus.QUEUED


def test_a_partial_lookup_still_holds_its_claim(store):
    first = _lookup()
    store.create(first, claim=True)
    store.finish(first.id, LookupStatus.PARTIAL, {"data": None, "checks": []})
    assert store.create(_lookup(), claim=True) == first.id


def test_release_inflight_deletes_the_claim_only_when_it_names_that_lookup(store, redis_client):
    first = _lookup()
    store.create(first, claim=True)
    key = store.inflight_key("cnpj", CNPJ)
    store.release_inflight("cnpj", CNPJ, new_lookup_id())
    assert redis_client.get(key) == first.id.encode()
    store.release_inflight("cnpj", CNPJ, first.id)
    assert redis_client.exists(key) == 0
    store.release_inflight("cnpj", CNPJ, first.id)  # releasing twice is harmless
    assert store.create(_lookup(), claim=True) is None


def test_a_joined_request_reads_the_shared_work_under_its_own_id_priority_times_and_call_ids(store):
    shared = _lookup()
    store.create(shared, claim=True)
    store.set_source(shared.id, SourceResult("brasilapi", SourceState.OK, data=COMPANY))
    alias_id = new_lookup_id()
    joined_at = shared.created_at + 2
    made = store.create_alias(alias_id, store.get(shared.id), priority=3, created_at=joined_at)
    read = store.get(alias_id)
    assert read == made and read.id == alias_id and read.priority == 3
    assert (read.created_at, read.deadline_at) == (joined_at, joined_at + store.settings.lookup_deadline)
    assert read.shared_id == shared.id and read.work_id == shared.id
    assert read.sources["brasilapi"].data == COMPANY and read.done == 1
    assert set(read.tasks) == set(shared.tasks)
    assert not set(read.tasks.values()) & set(shared.tasks.values())
    for source, task_id in read.tasks.items():
        assert store.task(task_id) == {
            "name": "job_queue.fetch_source",
            "lookup_id": alias_id,
            "source": source,
            "task_id": shared.tasks[source],
        }
    body = orjson.dumps(read.to_dict()).decode()
    assert shared.id not in body and all(task_id not in body for task_id in shared.tasks.values())
    store.finish(shared.id, LookupStatus.COMPLETE, {"data": {"n": 1}, "checks": []})
    assert store.get(alias_id).status == LookupStatus.COMPLETE


def test_an_alias_whose_shared_record_is_gone_or_is_itself_an_alias_reads_as_unknown(store, redis_client):
    shared = _lookup()
    store.create(shared)
    first_alias, second_alias = new_lookup_id(), new_lookup_id()
    joined = store.create_alias(first_alias, shared, priority=5, created_at=shared.created_at)
    store.create_alias(second_alias, joined, priority=5, created_at=shared.created_at)
    assert store.get(first_alias) is not None
    assert store.get(second_alias) is None
    redis_client.delete(store.record_key(shared.id))
    assert store.get(first_alias) is None


# -- lookups answered from the cache -------------------------------------------------------


def test_an_answered_lookup_is_sent_and_read_back_as_its_api_json(store):
    lookup = _answered()
    encoded = store.create_answered(lookup, versions=("cep", "01310100", (("viacep", 1.0),)))
    assert orjson.loads(encoded) == lookup.to_dict()
    assert b"<" not in encoded and b"&" not in encoded  # escaped like every API body
    read = store.get(lookup.id)
    assert read == lookup and read.encoded == encoded
    assert read.to_dict() == lookup.to_dict()


def test_answered_lookups_from_the_same_entries_share_one_stored_body(store, redis_client, settings):
    versions = ("cep", "01310100", (("viacep", 1.0),))
    first, second = _answered(), _answered()
    store.create_answered(first, versions)
    store.create_answered(second, versions)
    other = _answered(identifier="20040002")
    store.create_answered(other, None)
    prefix = settings.key_prefix
    assert len(list(redis_client.scan_iter(match=f"{prefix}:answer:*"))) == 2
    assert _own_keys(redis_client, settings) == {
        *(
            f"{prefix}:answer:{key.decode().rsplit(':', 1)[1]}"
            for key in redis_client.keys(f"{prefix}:answer:*")
        ),
        f"{prefix}:secret:answer-ids",
    }  # nothing of a lookup's own: its id carries it
    assert store.get(first.id).id == first.id and store.get(second.id).id == second.id
    assert store.get(other.id).identifier == "20040002"
    assert redis_client.zcard(f"{prefix}:lookups") == 0  # never changes again: no cleanup index


def test_an_answer_body_lost_with_redis_is_written_again_by_the_next_answer(store, redis_client, settings):
    """A restarted or flushed Redis loses the shared body: the next answer from the same entries
    once its check is due writes it again, though this process wrote it a moment ago (a head
    naming no body reads as unknown: a 200 then a 404)."""
    versions = ("cep", "01310100", (("viacep", 1.0),))
    store.BODY_CHECK_INTERVAL = 0  # checked on every answer here (at most once a second by default)
    store.create_answered(_answered(), versions)
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:answer:*"):
        redis_client.delete(key)
    later = _answered()
    store.create_answered(later, versions)
    assert store.get(later.id) is not None and store.get(later.id).id == later.id


def test_an_answer_whose_round_trip_failed_writes_its_body_with_the_next_one(settings, redis_client):
    """The body counts as written only once Redis took it: a failed round trip leaves it due."""
    versions = ("cep", "01310100", (("viacep", 2.0),))
    down = redis_store.connect(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    store = LookupStore(down, settings)  # a Redis that is not there: the round trip fails
    store.BODY_CHECK_INTERVAL = float("inf")  # no presence check to make up for a wrong count
    try:
        with pytest.raises(redis.ConnectionError):
            store.create_answered(_answered(), versions)
    finally:
        down.close()
    store.redis = store.answer_ids.redis = store.answered_counts.redis = redis_client  # Redis is back
    after = _answered()
    store.create_answered(after, versions)
    assert store.get(after.id) is not None


# -- TTLs ----------------------------------------------------------------------------------


def test_every_key_the_store_writes_expires_within_its_setting_but_the_index(settings, redis_client):
    settings = dataclasses.replace(
        settings, lookup_record_ttl=5000, lookup_retention=3000, lookup_deadline=30, defer_horizon=100
    )
    store = LookupStore(redis_client, settings)
    shared = _lookup()
    store.create(shared, claim=True)
    store.set_source(shared.id, SourceResult("brasilapi", SourceState.OK, data=COMPANY))
    store.finish(shared.id, LookupStatus.PARTIAL, {"data": None, "checks": []})
    store.register_task("finalize-1", "job_queue.finalize_lookup", shared.id)
    # Joining 1000 s after the shared record began: the alias lives only as long as that record.
    alias = store.create_alias(new_lookup_id(), shared, priority=2, created_at=shared.created_at + 1000)
    alias_call_ids = {store.task_key(task_id) for task_id in alias.tasks.values()}
    store.create_answered(_answered(), versions=("v", 1))
    bounds = {
        "lookup": settings.lookup_record_ttl,
        "task": settings.lookup_record_ttl,
        "inflight": int(settings.lookup_deadline + settings.defer_horizon + 60),
        "alias": settings.lookup_record_ttl - 1000,
        "answer": int(settings.lookup_retention * 1.2) + 1,
    }
    families = set()
    for key in _own_keys(redis_client, settings):
        family = key.split(":")[1]
        ttl = redis_client.ttl(key)
        if family in ("lookups", "secret"):
            assert ttl == -1 and key.split(":", 1)[1] in redis_store.WITHOUT_TTL
            continue
        families.add(family)
        assert family in bounds, key
        bound = bounds["alias"] if key in alias_call_ids else bounds[family]
        assert bound - 10 <= ttl <= bound, (key, ttl)  # set from its setting, not some other number
    assert families == set(bounds)


# -- cleanup -------------------------------------------------------------------------------


def test_delete_older_than_takes_old_lookups_their_aliases_call_ids_and_event_logs_only(store, redis_client):
    def event_key(lookup_id: str) -> str:
        return redis_store.key(store.settings, "events", lookup_id)

    now = time.time()
    old, recent = _lookup(created_at=now - 7200), _lookup(created_at=now)
    store.create(old)
    store.create(recent)
    alias_id = new_lookup_id()
    alias = store.create_alias(alias_id, old, priority=5, created_at=now - 7100)
    for lookup_id in (old.id, recent.id):
        redis_client.set(event_key(lookup_id), b"log", ex=600)
    assert store.delete_older_than(now - 3600, event_key) == 2  # the record and its alias
    assert store.get(old.id) is None and store.get(alias_id) is None
    assert redis_client.exists(event_key(old.id)) == 0
    gone = [*old.tasks.values(), *alias.tasks.values()]
    assert all(store.task(task_id) is None for task_id in gone)
    assert store.get(recent.id) == recent and redis_client.exists(event_key(recent.id)) == 1
    assert all(store.task(task_id) is not None for task_id in recent.tasks.values())
    assert redis_client.zrange(f"{store.settings.key_prefix}:lookups", 0, -1) == [recent.id.encode()]
    assert store.delete_older_than(now - 3600, event_key) == 0


def test_purge_type_removes_every_lookup_of_that_type_with_its_locks_and_keeps_the_rest(store, redis_client):
    def event_key(lookup_id: str) -> str:
        return redis_store.key(store.settings, "events", lookup_id)

    recorded = _lookup(identifier_type="cpf", identifier="52998224725")
    store.create(recorded, claim=True)
    redis_client.set(event_key(recorded.id), b"log", ex=600)
    answered = _answered(identifier_type="cpf", identifier="52998224725")
    store.create_answered(answered)
    kept, kept_answer = _lookup(), _answered()
    store.create(kept, claim=True)
    store.create_answered(kept_answer)
    assert store.purge_type("cpf", event_key) == 3  # a record, an answer and a lock
    assert store.get(recorded.id) is None and store.get(answered.id) is None
    assert redis_client.exists(event_key(recorded.id), store.inflight_key("cpf", "52998224725")) == 0
    assert all(store.task(task_id) is None for task_id in recorded.tasks.values())
    assert store.get(kept.id) == kept and store.get(kept_answer.id) is not None
    assert redis_client.get(store.inflight_key("cnpj", CNPJ)) == kept.id.encode()


def test_delete_stale_inflight_drops_only_locks_whose_record_is_gone(store, redis_client):
    live, dead = _lookup(), _lookup(identifier="11444777000161")
    store.create(live, claim=True)
    store.create(dead, claim=True)
    redis_client.delete(store.record_key(dead.id))
    assert store.delete_stale_inflight() == 1
    assert redis_client.exists(store.inflight_key("cnpj", "11444777000161")) == 0
    assert redis_client.get(store.inflight_key("cnpj", CNPJ)) == live.id.encode()
    assert store.delete_stale_inflight() == 0


# -- Redis unreachable ---------------------------------------------------------------------


def test_with_redis_unreachable_reads_and_writes_raise_connection_error_without_hanging():
    settings = Settings.from_env(
        {}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="tlookups-down"
    )
    client = redis_store.connect(settings)
    store = LookupStore(client, settings)
    lookup = _lookup()
    calls = {
        "get": lambda: store.get(lookup.id),
        "create": lambda: store.create(lookup, claim=True),
        "set_source": lambda: store.set_source(lookup.id, SourceResult("brasilapi", SourceState.OK)),
        "finish": lambda: store.finish(lookup.id, LookupStatus.COMPLETE, {}),
        "task": lambda: store.task("t"),
        "create_answered": lambda: store.create_answered(_answered()),
    }
    try:
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                call()
            assert time.monotonic() - started < 3 * settings.redis_socket_timeout + 1, name
    finally:
        client.close()
