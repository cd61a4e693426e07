"""pipeline.py: one lookup's flow, its functions called directly with no worker.

Each runs on the real parts (the test Redis, the sandbox upstream over HTTP); a test reads what a
function sent off the broker's lists and the deferred set, and what it recorded in the lookup's
record and event log.
"""

from __future__ import annotations

import time

import orjson
import pytest

from enrich import pipeline, redis_broker
from enrich.identifiers import parse
from enrich.lookups import SourceResult, SourceState
from enrich.services import Services
from enrich.task_messages import (
    FETCH_TASK,
    FINALIZE_TASK,
    LOOKUP_TASK,
    LookupTask,
    SourceCallTask,
    celery_priority,
)
from enrich.upstream_call import guarded_call

CPF = "111.444.777-35"
CEP_SOURCES = ("brasilapi", "viacep")


@pytest.fixture
def app(make_sandbox_app):
    """An in-process app on the test Redis whose sources are the sandbox's (no worker).

    ReceitaWS at one call a minute, so a test can fill its log of starts (2 a minute) and keep it full.
    """
    return make_sandbox_app({"RATE_LIMIT_RECEITAWS": "1"}, source_timeout=2.0)


def queued(parts: Services) -> list[tuple[int, str, list]]:
    """Every message waiting on the broker: (level, task name, args), most urgent level first."""
    found = []
    for level, name in enumerate(redis_broker.priority_lists(parts.settings.key_prefix)):
        for raw in parts.redis.lrange(name, 0, -1):
            message = orjson.loads(raw)
            args, _, _ = orjson.loads(redis_broker.message_text(message))
            found.append((level, message["headers"]["task"], args))
    return found


def deferred(parts: Services, task: str | None = None) -> list[tuple[dict, float]]:
    """The deferred set's entries (of `task`), as (entry, due time)."""
    entries = [
        (orjson.loads(raw), due)
        for raw, due in parts.redis.zrange(parts.deferred.key, 0, -1, withscores=True)
    ]
    return [(entry, due) for entry, due in entries if task is None or entry["task"] == task]


def events(parts: Services, lookup_id: str) -> list[tuple[str, dict]]:
    """The lookup's logged events, (type, data), oldest first."""
    return [(m.type, orjson.loads(m.data)) for m in parts.events.read_after(lookup_id)]


def cache_cep(parts: Services, cep: str) -> None:
    """Both CEP sources' answers in the cache, fetched from the sandbox."""
    for source in CEP_SOURCES:
        assert guarded_call(parts, source, parse(cep), batch=False).outcome == "ok"


def call(lookup, source: str, **changes) -> SourceCallTask:
    """The call of `source` for `lookup`, as its task carries it."""
    return SourceCallTask(lookup.id, source, lookup.type, lookup.identifier, lookup.priority, **changes)


def keys(parts: Services) -> set[bytes]:
    return set(parts.redis.scan_iter(match=f"{parts.settings.key_prefix}:*", count=1000))


# -- start_lookup ----------------------------------------------------------------------------


def test_a_cpf_is_answered_from_the_number_without_writing_to_redis(parts):
    before = keys(parts)

    lookup, created = pipeline.start_lookup(parts, parse(CPF))

    assert created and lookup.status == "complete" and not lookup.id and lookup.sources == {}
    assert lookup.identifier == "11144477735" and lookup.result["data"]["cpf"] == "111.444.777-35"
    assert keys(parts) == before and queued(parts) == []


def test_a_fully_cached_lookup_completes_at_once_and_sends_nothing(parts, sandbox):
    cep = sandbox.known("cep", seed=71)
    cache_cep(parts, cep)
    sandbox.reset()

    lookup, created = pipeline.start_lookup(parts, parse(cep))

    assert created and lookup.status == "complete" and lookup.cached
    assert {name: r.state for name, r in lookup.sources.items()} == dict.fromkeys(CEP_SOURCES, "ok")
    assert lookup.result["data"]["cep"] == cep
    assert parts.lookups.get(lookup.id).status == "complete"  # readable by its id
    assert queued(parts) == [] and deferred(parts) == []
    assert sandbox.served("brasilapi") + sandbox.served("viacep") == 0


def test_an_uncached_lookup_writes_its_record_and_claim_and_sends_one_lookup_task(parts, sandbox):
    cep = sandbox.known("cep", seed=72)

    lookup, created = pipeline.start_lookup(parts, parse(cep), priority=7)

    assert created and lookup.status == "queued" and set(lookup.tasks) == set(CEP_SOURCES)
    stored = parts.lookups.get(lookup.id)
    assert stored.status == "queued" and stored.tasks == lookup.tasks and stored.priority == 7
    assert parts.redis.get(parts.lookups.inflight_key("cep", cep)) == lookup.id.encode()
    assert queued(parts) == [(celery_priority(7), LOOKUP_TASK, [lookup.id, "cep", cep, 7, lookup.tasks])]
    ((deadline, due),) = deferred(parts)
    assert deadline == {
        "id": f"deadline:{lookup.id}",
        "task": FINALIZE_TASK,
        "args": [lookup.id, True],
        "options": {"priority": celery_priority(7)},
    }
    assert due == pytest.approx(lookup.deadline_at)
    assert sandbox.served("brasilapi") + sandbox.served("viacep") == 0  # the worker calls them


def test_a_second_start_for_the_same_identifier_joins_the_first_as_an_alias(parts, sandbox):
    cep = parse(sandbox.known("cep", seed=73))
    first, _ = pipeline.start_lookup(parts, cep, priority=5)

    second, created = pipeline.start_lookup(parts, cep, priority=8)

    assert not created and second.id != first.id and second.work_id == first.id
    assert second.priority == 8 and set(second.tasks) == set(first.tasks)
    assert not set(second.tasks.values()) & set(first.tasks.values())  # call ids of its own
    assert parts.lookups.get(second.id).work_id == first.id
    assert not parts.redis.exists(parts.lookups.record_key(second.id))  # its own record was dropped
    assert [task for _, task, _ in queued(parts)] == [LOOKUP_TASK]  # the first's task only
    assert [entry["id"] for entry, _ in deferred(parts)] == [f"deadline:{first.id}"]


def test_a_person_does_not_join_a_batch_items_lookup(parts, sandbox):
    cep = parse(sandbox.known("cep", seed=74))
    item, _ = pipeline.start_lookup(parts, cep, priority=pipeline.BATCH_PRIORITY)

    person, created = pipeline.start_lookup(parts, cep, priority=5)

    assert created and person.work_id == person.id != item.id
    assert sorted(queued(parts)) == sorted(
        [
            (celery_priority(5), LOOKUP_TASK, [person.id, "cep", cep.value, 5, person.tasks]),
            (celery_priority(0), LOOKUP_TASK, [item.id, "cep", cep.value, 0, item.tasks]),
        ]
    )


def test_refresh_skips_the_cache_and_starts_a_lookup(parts, sandbox):
    cep = sandbox.known("cep", seed=75)
    cache_cep(parts, cep)

    lookup, created = pipeline.start_lookup(parts, parse(cep), refresh=True)

    assert created and lookup.status == "queued" and not lookup.cached
    assert [task for _, task, _ in queued(parts)] == [LOOKUP_TASK]


# -- run_source_call ---------------------------------------------------------------------------


def test_an_answered_call_settles_its_source_caches_it_and_the_last_one_completes(parts, sandbox):
    cep = sandbox.known("cep", seed=76)
    lookup, _ = pipeline.start_lookup(parts, parse(cep))

    done = pipeline.run_source_call(parts, call(lookup, "viacep"), call_id=lookup.tasks["viacep"])

    assert done["state"] == "ok" and done["attempts"] == 1 and "data" not in done
    stored = parts.lookups.get(lookup.id)
    assert stored.sources["viacep"].state == "ok" and stored.sources["viacep"].data["cep"] == cep
    assert stored.status == "running"
    assert parts.cache.get("cep", "viacep", cep).found
    viacep_states = [data["state"] for kind, data in events(parts, lookup.id) if kind == "source"]
    assert viacep_states == ["running", "ok"]

    pipeline.run_source_call(parts, call(lookup, "brasilapi"), call_id=lookup.tasks["brasilapi"])

    assert parts.lookups.get(lookup.id).status == "complete"
    kinds = [kind for kind, _ in events(parts, lookup.id)]
    assert kinds.count("complete") == 1 and kinds[-1] == "complete"
    assert sandbox.served("viacep") == 1


def test_a_call_without_a_token_waits_in_the_deferred_set_reserved_at_the_slot_priority(parts, sandbox):
    cep = sandbox.known("cep", seed=77)
    lookup, _ = pipeline.start_lookup(parts, parse(cep), priority=6)
    limiter = parts.rate_limiter
    # The bucket, and about five seconds of tokens ahead, taken by others.
    assert all(limiter.reserve("viacep").granted for _ in range(limiter.capacity("viacep") + 50))
    call_id = lookup.tasks["viacep"]

    waiting = pipeline.run_source_call(parts, call(lookup, "viacep"), call_id=call_id)

    assert waiting["state"] == "rate_limited" and waiting["scheduled_at"] > time.time()
    ((entry, due),) = deferred(parts, FETCH_TASK)
    token_at = waiting["scheduled_at"]  # its send slot comes no earlier than its token
    assert entry["args"] == call(lookup, "viacep", reserved=True, token_at=token_at).args()
    assert entry["options"] == {"priority": 0, "task_id": call_id}  # ahead of new work
    # Sent ahead of its slot by the limiter's lead, to wait at its send slot rather than run late.
    assert limiter.send_lead("viacep") == 0.5
    assert due == pytest.approx(waiting["scheduled_at"] - 0.5)
    source = parts.lookups.get(lookup.id).sources["viacep"]
    assert source.state == "rate_limited" and not source.settled
    assert sandbox.served("viacep") == 0


def test_a_reserved_call_that_finds_the_log_of_starts_full_waits_again_keeping_its_token(parts, sandbox):
    cnpj = sandbox.known("cnpj", seed=78)
    lookup, _ = pipeline.start_lookup(parts, parse(cnpj))
    taken = [parts.rate_limiter.send_slot("receitaws").taken for _ in range(2)]
    assert taken == [True, True]  # the minute is full
    call_id = lookup.tasks["receitaws"]

    paced = pipeline.run_source_call(parts, call(lookup, "receitaws", reserved=True), call_id=call_id)

    assert paced["state"] == "rate_limited" and paced["scheduled_at"] > time.time() + 50
    ((entry, _),) = deferred(parts, FETCH_TASK)
    token_at = paced["scheduled_at"]  # keeping its token, for the next free slot
    assert entry["args"] == call(lookup, "receitaws", reserved=True, token_at=token_at).args()
    assert entry["options"] == {"priority": 0, "task_id": call_id}
    assert sandbox.served("receitaws") == 0


def test_a_transient_failure_schedules_a_retry_with_the_next_attempt_and_no_hold(parts, sandbox):
    sandbox.control("viacep", error_rate=1.0)
    cep = sandbox.known("cep", seed=79)
    lookup, _ = pipeline.start_lookup(parts, parse(cep), priority=pipeline.BATCH_PRIORITY)
    held = call(lookup, "viacep", held_since=time.time())  # a batch call that was held before
    call_id = lookup.tasks["viacep"]

    before = time.time()
    retrying = pipeline.run_source_call(parts, held, call_id=call_id)

    assert retrying["state"] == "retrying" and "HTTP 500" in retrying["error"]
    ((entry, due),) = deferred(parts, FETCH_TASK)
    assert entry["args"] == call(lookup, "viacep", attempt=1).args()  # not reserved, held_since 0
    assert entry["options"] == {"priority": celery_priority(0), "task_id": call_id}
    base = parts.settings.retry_backoff_base
    assert before + base / 2 <= due <= time.time() + base  # attempt 0: half fixed, half random
    assert parts.lookups.get(lookup.id).sources["viacep"].attempts == 1


def test_a_retry_after_a_429_waits_at_least_what_the_upstream_asked(parts, sandbox):
    sandbox.control("viacep", quota_per_minute=0)  # every request: 429 with Retry-After: 60
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=80)))

    before = time.time()
    pipeline.run_source_call(parts, call(lookup, "viacep"), call_id=lookup.tasks["viacep"])

    ((_, due),) = deferred(parts, FETCH_TASK)
    assert due >= before + 60


def test_a_call_failing_past_retry_max_becomes_a_dead_letter_and_settles_error(parts, sandbox):
    sandbox.control("viacep", outage=True)
    cep = sandbox.known("cep", seed=81)
    lookup, _ = pipeline.start_lookup(parts, parse(cep))
    last = parts.settings.retry_max

    gave_up = pipeline.run_source_call(
        parts, call(lookup, "viacep", attempt=last), call_id=lookup.tasks["viacep"]
    )

    assert gave_up["state"] == "error" and gave_up["attempts"] == last + 1
    assert (
        gave_up["error"].startswith(f"gave up after {last + 1} attempts: ") and "HTTP 503" in gave_up["error"]
    )
    (letter,) = parts.dead_letters.list()
    assert (letter["lookup_id"], letter["source"], letter["identifier"]) == (lookup.id, "viacep", cep)
    assert deferred(parts, FETCH_TASK) == []
    assert parts.lookups.get(lookup.id).sources["viacep"].settled


def test_a_call_of_a_settled_source_finalizes_the_lookup_and_calls_nothing(parts, sandbox):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.unknown("cep", seed=82)))
    for source in CEP_SOURCES:  # a worker settled both, then died before finalizing
        parts.lookups.set_source(
            lookup.id, SourceResult(source, SourceState.NOT_FOUND, updated_at=time.time())
        )
    assert parts.lookups.get(lookup.id).status == "running"

    redelivered = pipeline.run_source_call(parts, call(lookup, "viacep"), call_id=lookup.tasks["viacep"])

    assert redelivered == {"source": "viacep", "state": "already_settled"}
    assert parts.lookups.get(lookup.id).status == "complete"
    assert sandbox.served("viacep") == 0


def test_an_open_breaker_serves_a_cached_copy_or_settles_circuit_open(parts, sandbox):
    cep = sandbox.known("cep", seed=83)
    assert guarded_call(parts, "viacep", parse(cep), batch=False).outcome == "ok"
    lookup, _ = pipeline.start_lookup(parts, parse(cep), refresh=True)
    for source in CEP_SOURCES:
        parts.breakers.force_open(source)
    sandbox.reset()

    for source in CEP_SOURCES:
        pipeline.run_source_call(parts, call(lookup, source), call_id=lookup.tasks[source])

    done = parts.lookups.get(lookup.id)
    assert done.sources["viacep"].state == "stale" and done.sources["viacep"].data["cep"] == cep
    assert done.sources["brasilapi"].state == "circuit_open"
    assert "no stale copy" in done.sources["brasilapi"].error
    assert done.status == "complete"
    assert sandbox.served("viacep") + sandbox.served("brasilapi") == 0


def test_the_lookup_task_calls_every_missing_source_and_a_redelivery_calls_none(parts, sandbox):
    cep = sandbox.known("cep", seed=84)
    lookup, _ = pipeline.start_lookup(parts, parse(cep))
    task = LookupTask(lookup.id, "cep", cep, lookup.priority, lookup.tasks)

    outcomes = pipeline.run_lookup_calls(parts, task)

    assert {name: outcome["state"] for name, outcome in outcomes.items()} == dict.fromkeys(CEP_SOURCES, "ok")
    assert parts.lookups.get(lookup.id).status == "complete"
    assert pipeline.run_lookup_calls(parts, task) == {}
    assert sandbox.served("viacep") == 1 and sandbox.served("brasilapi") == 1


# -- settle and finalize ---------------------------------------------------------------------


def test_settle_keeps_a_settled_answer_unless_told_to_replace_it(parts, sandbox):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=85)))
    error = SourceResult("viacep", SourceState.ERROR, error="gave up")

    assert pipeline.settle(parts, lookup.id, error)
    assert not pipeline.settle(parts, lookup.id, SourceResult("viacep", SourceState.OK, data={"cep": "x"}))
    assert parts.lookups.get(lookup.id).sources["viacep"].state == "error"
    assert pipeline.settle(
        parts, lookup.id, SourceResult("viacep", SourceState.NOT_FOUND), replace_settled=True
    )
    assert parts.lookups.get(lookup.id).sources["viacep"].state == "not_found"
    progress = [
        (data["done"], data["total"]) for kind, data in events(parts, lookup.id) if kind == "progress"
    ]
    assert progress == [(1, 2)]  # settled once, whatever replaced it


def test_finalize_completes_only_once_every_source_settled_and_only_once(parts, sandbox):
    cep = sandbox.unknown("cep", seed=86)
    lookup, _ = pipeline.start_lookup(parts, parse(cep))

    assert pipeline.finalize(parts, lookup.id) is None  # nothing settled, not at the deadline
    pipeline.settle(parts, lookup.id, SourceResult("brasilapi", SourceState.NOT_FOUND))
    assert pipeline.finalize(parts, lookup.id) is None
    pipeline.settle(parts, lookup.id, SourceResult("viacep", SourceState.NOT_FOUND))  # the last: finalizes

    assert parts.lookups.get(lookup.id).status == "complete"
    assert pipeline.finalize(parts, lookup.id) is None
    assert pipeline.finalize(parts, lookup.id, at_deadline=True) is None
    assert [kind for kind, _ in events(parts, lookup.id)].count("complete") == 1
    assert parts.redis.get(parts.lookups.inflight_key("cep", cep)) is None  # the claim released
    assert deferred(parts, FINALIZE_TASK) == []  # its deadline cancelled


def test_finalize_at_the_deadline_turns_partial_once_and_complete_when_the_last_source_settles(
    parts, sandbox
):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=87)))
    pipeline.settle(parts, lookup.id, SourceResult("viacep", SourceState.RUNNING))

    assert pipeline.finalize(parts, lookup.id, at_deadline=True) == "partial"
    assert pipeline.finalize(parts, lookup.id, at_deadline=True) is None
    (partial,) = [data for kind, data in events(parts, lookup.id) if kind == "partial"]
    assert set(partial["unsettled"]) == set(CEP_SOURCES)

    for source in CEP_SOURCES:
        pipeline.settle(parts, lookup.id, SourceResult(source, SourceState.ERROR, error="gave up"))
    assert parts.lookups.get(lookup.id).status == "complete"


def test_a_lookup_whose_task_never_reached_the_broker_is_sent_again_at_its_deadline(parts, sandbox):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=88)), priority=4)
    sent = [(celery_priority(4), LOOKUP_TASK, [lookup.id, "cep", lookup.identifier, 4, lookup.tasks])]
    assert pipeline.finalize(parts, lookup.id, at_deadline=True) == "partial"
    assert queued(parts) == sent  # its message is still there: not sent twice

    other, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=89)), priority=4)
    parts.redis.delete(*redis_broker.priority_lists(parts.settings.key_prefix))  # as if never sent
    assert pipeline.finalize(parts, other.id, at_deadline=True) == "partial"

    assert queued(parts) == [
        (celery_priority(4), LOOKUP_TASK, [other.id, "cep", other.identifier, 4, other.tasks])
    ]


def test_never_started_and_send_again_cover_only_the_unsettled_sources(parts, sandbox):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=90)))
    assert pipeline.never_started(parts.lookups.get(lookup.id))

    pipeline.settle(parts, lookup.id, SourceResult("viacep", SourceState.NOT_FOUND))
    half = parts.lookups.get(lookup.id)
    assert pipeline.never_started(half)  # what is left never started
    parts.redis.delete(*redis_broker.priority_lists(parts.settings.key_prefix))
    pipeline.send_again(parts, half)
    assert queued(parts) == [
        (
            celery_priority(5),
            LOOKUP_TASK,
            [lookup.id, "cep", lookup.identifier, 5, {"brasilapi": lookup.tasks["brasilapi"]}],
        )
    ]

    pipeline.settle(parts, lookup.id, SourceResult("brasilapi", SourceState.RUNNING))
    assert not pipeline.never_started(parts.lookups.get(lookup.id))
    pipeline.settle(parts, lookup.id, SourceResult("brasilapi", SourceState.OK, data={}))
    assert not pipeline.never_started(parts.lookups.get(lookup.id))  # nothing left to start


# -- the cross-check's CEP and the backoff ----------------------------------------------------


def test_the_company_cep_comes_from_the_cache_without_a_request(parts, sandbox):
    cep = sandbox.known("cep", seed=91)
    parts.cache.set("cep", "viacep", cep, {"cep": cep, "municipio": "Cidade"}, found=True)

    assert pipeline._company_cep(parts, cep) == ({"cep": cep, "municipio": "Cidade"}, None)
    assert sandbox.served("brasilapi") + sandbox.served("viacep") == 0


def test_a_company_cep_missing_from_the_cache_is_fetched_through_the_guarded_call(parts, sandbox):
    cep = sandbox.known("cep", seed=92)

    data, error = pipeline._company_cep(parts, cep)

    assert error is None and data["cep"] == cep
    assert sandbox.served("brasilapi") == 1 and sandbox.served("viacep") == 0  # the first source answered
    assert parts.cache.get("cep", "brasilapi", cep).data == data


def test_a_company_cep_not_found_by_its_first_source_is_not_found(parts, sandbox):
    assert pipeline._company_cep(parts, sandbox.unknown("cep", seed=93)) == (None, "not_found")
    assert sandbox.served("brasilapi") == 1 and sandbox.served("viacep") == 0


def test_the_company_cep_is_rate_limited_when_no_source_has_a_token_now(parts, sandbox):
    limiter = parts.rate_limiter
    for source in CEP_SOURCES:  # every token, and some ahead, taken by others
        assert all(limiter.reserve(source).granted for _ in range(limiter.capacity(source) + 50))

    assert pipeline._company_cep(parts, sandbox.known("cep", seed=94)) == (None, "viacep is rate limited")
    assert sandbox.served("brasilapi") + sandbox.served("viacep") == 0, sandbox.get("/_arrivals/brasilapi").text


def test_the_backoff_is_half_fixed_half_random_and_capped(parts):
    settings = parts.settings
    for attempt in range(12):
        delay = min(settings.retry_backoff_max, settings.retry_backoff_base * 2**attempt)
        waits = [pipeline._backoff(parts.settings, attempt) for _ in range(200)]
        assert all(delay / 2 <= wait <= delay for wait in waits), (attempt, min(waits), max(waits))
        assert len(set(waits)) > 1  # jittered
    assert pipeline._backoff(parts.settings, 30) <= settings.retry_backoff_max
