"""The status history: counters in 10 s buckets, p95 from histogram counts, sampling, Redis down, the endpoint."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from conftest import FAST_LIMITS, wait_for

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich import maintenance, status_history
from enrich.deferred_calls import DeferredCalls
from enrich.lookups import Lookup, LookupStatus, SourceResult, SourceState, new_lookup_id
from enrich.services import services
from enrich.settings import Settings
from enrich.status_history import BUCKET_SECONDS, bucket_key, bucket_start, quantile_from_bins

CNPJ = "11222333000181"
COMPANY = {"cnpj": CNPJ, "razao_social": "ACME LTDA", "situacao_cadastral": "ATIVA", "endereco": {}}


@pytest.fixture
def client(app):
    return app.test_client()


def _history(app, minutes: int = 1, now: float | None = None) -> dict:
    with app.app_context():
        return maintenance.status_history_series(services(), minutes, now)


def _totals(redis_client, settings) -> dict[str, int]:
    """Every counter summed over all buckets (a test may straddle a bucket boundary)."""
    totals: dict[str, int] = {}
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:history:*"):
        for field, value in redis_client.hgetall(key).items():
            if field.decode() != "sampled_at" and value.isdigit():
                totals[field.decode()] = totals.get(field.decode(), 0) + int(value)
    return totals


def _lookup(created_at: float, status: LookupStatus = LookupStatus.QUEUED) -> Lookup:
    return Lookup(
        id=new_lookup_id(),
        type="cep",
        identifier="01310100",
        priority=5,
        status=status,
        created_at=created_at,
        deadline_at=created_at + 15,
        sources={"viacep": SourceResult("viacep", SourceState.PENDING)},
    )


# -- counters ------------------------------------------------------------------------------


def test_counters_land_in_the_bucket_of_their_time_and_expire_after_an_hour(settings, redis_client):
    at = 1_800_000_003.5
    assert status_history.count(redis_client, settings, {"started": 2}, now=at)
    assert status_history.count(redis_client, settings, {"started": 1}, now=at + 6)  # same bucket
    assert status_history.count(redis_client, settings, {"started": 5}, now=at + 7)  # the next one
    first, second = bucket_key(settings, 1_800_000_000), bucket_key(settings, 1_800_000_010)
    assert first == f"{settings.key_prefix}:history:1800000000"
    assert redis_client.hget(first, "started") == b"3"
    assert redis_client.hget(second, "started") == b"5"
    assert 3600 < redis_client.ttl(first) <= status_history.BUCKET_TTL_SECONDS


def test_cached_answers_and_started_lookups_are_counted_by_outcome(app, client, redis_client):
    cache = services(app).cache
    cache.set("cnpj", "brasilapi", CNPJ, COMPANY)
    cache.set("cnpj", "receitaws", CNPJ, COMPANY)
    cache.set("cnpj", "opencnpj", CNPJ, COMPANY)
    for _ in range(3):
        assert client.post("/api/lookups", json={"identifier": CNPJ}).status_code == 200
    assert client.post("/api/lookups", json={"identifier": "01310100"}).status_code == 202
    history = _history(app)
    assert sum(history["lookups_answered"]) == 3
    assert sum(history["lookups_started"]) == 1
    assert sum(history["lookups_finished"]) == 0  # no worker: the started one is still running


def test_the_current_bucket_rate_is_per_second_of_the_bucket_so_far(app, settings, redis_client):
    start = bucket_start(time.time()) - 10 * BUCKET_SECONDS  # a fixed past moment, read as "now"
    status_history.count(redis_client, settings, {"answered": 3, "started": 1}, now=start + 1)
    status_history.count(redis_client, settings, {"answered": 5}, now=start - 3)  # the bucket before
    history = _history(app, now=start + 2)
    assert history["buckets"][-2:] == [start - BUCKET_SECONDS, start]
    assert history["lookups_per_second"][-2:] == [0.5, 2.0]  # 5 in a whole bucket; 4 in its first 2 s


def test_a_request_that_joins_a_running_lookup_is_not_counted_as_started(app, redis_client):
    store = services(app).lookups
    first, second = _lookup(time.time()), _lookup(time.time())  # the same identifier
    assert store.create(first, claim=True) is None
    assert store.create(second, claim=True) == first.id  # joins the first
    assert _totals(redis_client, services(app).settings)["started"] == 1


def test_a_first_finish_counts_the_latency_since_creation_once(app, redis_client):
    store = services(app).lookups
    quick, slow = _lookup(time.time() - 0.3), _lookup(time.time() - 20)
    store.create(quick)
    store.create(slow)
    assert store.finish(quick.id, LookupStatus.COMPLETE, {"data": None, "checks": []})
    assert store.finish(slow.id, LookupStatus.PARTIAL, {"data": None, "checks": []})
    assert store.finish(slow.id, LookupStatus.COMPLETE, {"data": None, "checks": []})  # later: not again
    assert not store.finish(quick.id, LookupStatus.COMPLETE, {"data": None, "checks": []})
    bucket = _totals(redis_client, services(app).settings)
    assert bucket["started"] == 2
    assert bucket["finished:complete"] == 1 and bucket["finished:partial"] == 1
    assert bucket["latency:400"] == 1  # 300 ms and a bit: the 250-400 ms bin
    assert bucket["latency:30000"] == 1  # 20 s: the 15-30 s bin
    assert sum(_history(app)["lookups_finished"]) == 2


def test_rate_limit_waits_are_counted_with_their_deferred_add_and_other_adds_are_not(
    app, settings, redis_client
):
    deferred: DeferredCalls = services(app).deferred
    deferred.add(time.time() + 5, "job_queue.fetch_source", ["a"], rate_limit_wait=True)
    with redis_client.pipeline(transaction=False) as pipe:
        deferred.add(time.time() + 5, "job_queue.fetch_source", ["b"], pipe=pipe, rate_limit_wait=True)
        pipe.execute()
    deferred.add(time.time() + 5, "job_queue.fetch_source", ["retry"])  # a retry's backoff, say
    assert deferred.pending() == 3
    assert _totals(redis_client, settings) == {"rate_limit_waits": 2}
    assert sum(_history(app)["rate_limit_waits"]) == 2


# -- p95 -----------------------------------------------------------------------------------


def test_p95_is_interpolated_inside_the_bin_it_falls_in():
    # 90 lookups in the 50-100 ms bin, 10 in the 600-1000 ms bin: the 95th is halfway into the latter.
    assert quantile_from_bins({"latency:100": 90, "latency:1000": 10}) == 800.0
    assert quantile_from_bins({"latency:25": 20}) == 23.8  # 95% of the way from 0 to 25
    assert quantile_from_bins({"latency:100": 1}) == 97.5
    assert quantile_from_bins({"latency:inf": 3, "latency:100": 1}) == 60_000.0  # unbounded: its lower bound
    assert quantile_from_bins({}) is None
    assert quantile_from_bins({"latency:100": 0}) is None


def test_each_bucket_has_the_p95_of_its_own_finishes(app, settings, redis_client):
    now = time.time()
    current = bucket_start(now)
    for milliseconds, times in ((80, 19), (900, 1)):
        for _ in range(times):
            status_history.count(
                redis_client, settings, {status_history.latency_field(milliseconds): 1}, now=current + 1
            )
    status_history.count(redis_client, settings, {status_history.latency_field(5000): 1}, now=current - 5)
    history = _history(app, now=current + 2)
    # 20 finishes: the 19th is the last of the 50-100 ms bin, the 95th percentile (rank 19) is 100 ms.
    assert history["p95_ms"][-1] == 100.0
    assert history["p95_ms"][-2] == 5900.0  # one 5 s finish alone: 95% into the 4-6 s bin
    assert history["p95_ms"][:-2] == [None] * (len(history["p95_ms"]) - 2)


# -- gauges --------------------------------------------------------------------------------


def test_sampling_writes_once_per_bucket_and_the_first_sampler_wins(app, settings, redis_client):
    now = bucket_start(time.time()) + 1.0  # now + 0.5 stays in the same bucket, whatever the clock says
    with app.app_context():
        assert maintenance.sample_status_history(services(), now) is True
        services(app).breakers.force_open("receitaws")
        assert (
            maintenance.sample_status_history(services(), now + 0.5) is False
        )  # same bucket: the first sample stands
        assert maintenance.sample_status_history(services(), now + BUCKET_SECONDS) is True
    first = redis_client.hgetall(bucket_key(settings, bucket_start(now)))
    second = redis_client.hgetall(bucket_key(settings, bucket_start(now + BUCKET_SECONDS)))
    assert first[b"breaker:receitaws"] == b"closed" and second[b"breaker:receitaws"] == b"open"
    assert float(first[b"sampled_at"]) == now
    history = _history(app, now=now + BUCKET_SECONDS)
    assert history["breakers"]["receitaws"][-2:] == ["closed", "open"]
    assert history["breakers"]["brasilapi"][-2:] == ["closed", "closed"]
    assert history["breakers"]["viacep"][:-2] == [None] * (len(history["buckets"]) - 2)  # never sampled


def test_the_last_point_is_live_while_the_stored_sample_keeps_the_first(app, settings, redis_client):
    now = time.time()
    with app.app_context():
        maintenance.sample_status_history(services(), now)
        services(app).breakers.force_open("viacep")
    assert _history(app, now=now + 0.5)["breakers"]["viacep"][-1] == "open"
    assert redis_client.hget(bucket_key(settings, bucket_start(now)), "breaker:viacep") == b"closed"


def test_a_history_read_samples_the_current_bucket_when_no_one_has(app, client, settings, redis_client):
    assert client.post("/api/lookups", json={"identifier": "01310100"}).status_code == 202
    now = time.time()
    current = bucket_key(settings, bucket_start(now))
    assert not redis_client.hexists(current, "sampled_at")
    history = _history(app, now=now)
    assert redis_client.hexists(current, "sampled_at")
    # One fetch task on the broker (no worker runs here) and the lookup's deadline in the deferred set.
    assert history["queue_depth"][-1] == 2
    assert history["queue_depth"][:-1] == [None] * (len(history["buckets"]) - 1)
    assert set(history["breakers"]) == set(settings.sources)


def test_the_hit_rate_is_the_change_of_the_cache_totals_since_the_sample_before(app, settings, redis_client):
    cache = services(app).cache
    now = time.time()
    with app.app_context():
        maintenance.sample_status_history(services(), now - BUCKET_SECONDS)
    cache.set("cep", "viacep", "01310100", {"cep": "01310100"})
    for _ in range(3):
        cache.get("cep", "viacep", "01310100")  # hits
    cache.get("cep", "viacep", "20040002")  # a miss
    history = _history(app, now=now)  # samples the current bucket, with this process's counts flushed
    assert history["cache_hit_rate"][-2:] == [None, 0.75]  # the first sample has no baseline
    with app.app_context():
        maintenance.sample_status_history(services(), now + BUCKET_SECONDS)  # no reads since: no rate
    assert _history(app, now=now + BUCKET_SECONDS)["cache_hit_rate"][-1] is None


def test_a_real_worker_counts_its_finishes_and_samples_every_bucket_without_any_read(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS)
    stack.start_worker()
    stack.start_web()
    cep = sandbox.known("cep", seed=60)
    stack.wait_status(stack.post_lookup(cep).json()["id"])
    assert stack.post_lookup(cep).status_code == 200  # now from the cache
    client, settings = services(stack.app).redis, stack.settings

    def sampled() -> int:
        keys = client.scan_iter(match=f"{settings.key_prefix}:history:*")
        return sum(bool(client.hexists(key, "sampled_at")) for key in keys)

    # Nothing read the history: the worker's dispatcher samples each 10 s bucket on its own.
    first = wait_for(sampled, timeout=30, message="the worker's first sample")
    wait_for(lambda: sampled() > first, timeout=30, message="a sample of the next bucket")
    totals = _totals(client, settings)
    assert totals["started"] == totals["answered"] == totals["finished:complete"] == 1
    assert sum(n for field, n in totals.items() if field.startswith("latency:")) == 1
    body = stack.get("/api/status/history?minutes=2").json()
    assert [p for p in body["p95_ms"] if p is not None] and sum(body["lookups_finished"]) == 1


# -- Redis down ----------------------------------------------------------------------------


@pytest.fixture
def down_app():
    settings = Settings.from_env(
        {},
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        key_prefix="thistory-down",
        lookup_rate_limit="off",
    )
    app = create_app(settings)
    yield app
    close_app(app)


def test_with_redis_down_counters_and_samples_are_skipped_and_logged_once(down_app, caplog, monkeypatch):
    monkeypatch.setattr(status_history, "_last_warning", [float("-inf")])
    client, settings = services(down_app).redis, services(down_app).settings
    with caplog.at_level(logging.WARNING, logger="status_history"):
        started = time.monotonic()
        assert status_history.count(client, settings, {"started": 1}) is False
        with down_app.app_context():
            assert maintenance.sample_status_history(services()) is False
        assert time.monotonic() - started < 5  # each gives up at the socket timeout, never hangs
    warnings = [r for r in caplog.records if r.name == "status_history"]
    assert len(warnings) == 1 and "skipped, Redis unreachable" in warnings[0].getMessage()


def test_with_redis_down_a_history_read_raises_and_the_endpoint_answers_503(down_app):
    with down_app.app_context(), pytest.raises(redis.RedisError):
        maintenance.status_history_series(services(), 5)
    response = down_app.test_client().get("/api/status/history?minutes=5")
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable" and response.headers["Retry-After"] == "5"


# -- endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("minutes", ["0", "61", "-1", "abc", "1.5", "", " 5", "５", "100"])
def test_the_endpoint_refuses_minutes_outside_1_to_60(client, minutes):
    response = client.get("/api/status/history", query_string={"minutes": minutes})
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "invalid_request",
        "message": "minutes must be an integer from 1 to 60",
        "field": "minutes",
    }


@pytest.mark.parametrize(("query", "points"), [("", 90), ("?minutes=1", 6), ("?minutes=60", 360)])
def test_the_endpoint_answers_one_point_per_bucket_of_the_window(client, query, points):
    response = client.get("/api/status/history" + query)
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert len(body["buckets"]) == points
    assert body["buckets"][-1] == bucket_start(body["time"])
    assert all(b - a == BUCKET_SECONDS for a, b in zip(body["buckets"], body["buckets"][1:], strict=False))
    for name in ("lookups_per_second", "p95_ms", "cache_hit_rate", "queue_depth", "rate_limit_waits"):
        assert len(body[name]) == points, name
    assert all(len(states) == points for states in body["breakers"].values())
    assert response.headers["Content-Security-Policy"]
