"""Feature flags: stored in Redis, obeyed by the cache, the rate limiter and the breakers, no restart."""

from __future__ import annotations

import time

import pytest
import requests
from conftest import FAST_LIMITS, wait_for

from app import create_app
from cache_manager import Cache
from circuit_breaker_manager import BreakerManager, BreakerOpen
from devstack.embedded_redis import free_port
from enrich import redis_store
from enrich.feature_flags import FAILURE_BACKOFF, FeatureFlags, UnknownFlag
from enrich.rate_limiter import RateLimiter
from enrich.services import services
from enrich.settings import Settings

ADMIN = {"Authorization": "Bearer test-admin-token"}


def _settings(settings: Settings, **overrides) -> Settings:
    """The test's Redis and key prefix; flags re-read on every check unless told otherwise."""
    values = {"redis_url": settings.redis_url, "key_prefix": settings.key_prefix, "flags_refresh_interval": 0}
    return Settings.from_env({}, **{**values, **overrides})


def test_flags_default_to_their_settings_until_set_at_run_time(settings, redis_client):
    flags = FeatureFlags(redis_client, _settings(settings, cache_enabled=False))
    assert flags.all() == {
        "rate_limiting": {"enabled": True, "source": "settings", "default": True},
        "circuit_breaker": {"enabled": True, "source": "settings", "default": True},
        "cache": {"enabled": False, "source": "settings", "default": False},
    }
    assert flags.set("cache", True) == {"enabled": True, "source": "redis", "default": False}
    assert flags.enabled("cache") is True
    flags.set("cache", None)
    assert flags.enabled("cache") is False and flags.all()["cache"]["source"] == "settings"
    with pytest.raises(UnknownFlag):
        flags.set("turbo", True)


def test_a_flag_set_in_one_process_holds_in_another_within_the_refresh_interval(settings, redis_client):
    other = FeatureFlags(redis_client, _settings(settings, flags_refresh_interval=0.2))
    assert other.enabled("rate_limiting") is True  # read now: cached for 0.2 s
    FeatureFlags(redis_client, _settings(settings)).set("rate_limiting", False)
    wait_for(
        lambda: other.enabled("rate_limiting") is False, timeout=5, message="the flag to reach the other"
    )


def test_flags_keep_their_last_values_while_redis_is_down(settings, redis_client):
    FeatureFlags(redis_client, _settings(settings)).set("cache", False)
    down = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="down")
    offline = FeatureFlags(redis_store.connect(down), down)
    assert offline.enabled("cache") is True  # never read: the setting's default, no exception
    flags = FeatureFlags(redis_client, _settings(settings))
    assert flags.enabled("cache") is False
    flags.redis = offline.redis  # the same process, now cut off from Redis
    flags._read_at = float("-inf")
    assert flags.enabled("cache") is False


def test_after_a_failed_read_a_process_waits_before_trying_redis_again(settings):
    down = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="down")
    flags = FeatureFlags(redis_store.connect(down), down)  # re-reads every second while Redis answers
    assert flags.enabled("cache") is True
    # Each try can cost a request the socket timeout while Redis hangs: the next one waits 5 s.
    assert flags._read_at - time.monotonic() > FAILURE_BACKOFF - down.flags_refresh_interval - 1


def test_cache_flag_off_makes_every_read_miss_and_skips_writes(settings, redis_client):
    current = _settings(settings)
    flags = FeatureFlags(redis_client, current)
    cache = Cache(redis_client, current, near=None, flags=flags)
    cache.set("cep", "viacep", "01310100", {"cep": "01310100"})
    assert cache.get("cep", "viacep", "01310100") is not None
    flags.set("cache", False)
    assert cache.get("cep", "viacep", "01310100") is None
    assert cache.get_stale("cep", "viacep", "01310100") is None
    cache.set("cep", "viacep", "04538133", {"cep": "04538133"})
    flags.set("cache", None)
    assert cache.get("cep", "viacep", "01310100") is not None  # kept while off
    assert cache.get("cep", "viacep", "04538133") is None  # never written


def test_rate_limiting_flag_off_lets_calls_past_an_empty_bucket(settings, redis_client):
    current = _settings(settings)
    flags = FeatureFlags(redis_client, current)
    limiter = RateLimiter(redis_client, current, flags)
    # 2.85 a minute, burst 1 and the interactive reserve of 2: the fourth is a slot ahead.
    assert all(limiter.reserve("receitaws").wait == 0 for _ in range(limiter.capacity("receitaws")))
    assert limiter.await_send("receitaws")[0] == 0
    assert limiter.reserve("receitaws").wait > 0
    flags.set("rate_limiting", False)
    assert [limiter.reserve("receitaws").wait for _ in range(5)] == [0.0] * 5
    assert limiter.await_send("receitaws") == (0.0, None)  # no send slot either
    flags.set("rate_limiting", None)
    assert limiter.reserve("receitaws").wait > 0


def test_breaker_flag_off_calls_through_an_open_breaker_and_records_nothing(settings, redis_client):
    current = _settings(settings)
    flags = FeatureFlags(redis_client, current)
    breakers = BreakerManager(redis_client, current, flags)
    breakers.force_open("viacep")
    with pytest.raises(BreakerOpen):
        breakers.call("viacep", lambda: "answer")
    flags.set("circuit_breaker", False)
    assert breakers.call("viacep", lambda: "answer") == "answer"
    assert breakers.status("viacep").state == "open"  # untouched while the flag is off
    with pytest.raises(KeyError):
        breakers.call("nosuchsource", lambda: "answer")


def test_admin_api_lists_and_sets_flags(settings, redis_client):
    app = create_app(_settings(settings, admin_token="secret-token"))
    other = create_app(_settings(settings))  # another process of the same deployment
    client = app.test_client()
    auth = {"Authorization": "Bearer secret-token"}
    assert client.get("/api/admin/flags").status_code == 401
    listed = client.get("/api/admin/flags", headers=auth).get_json()
    assert set(listed) == {"rate_limiting", "circuit_breaker", "cache"}
    answer = client.put("/api/admin/flags/cache", json={"enabled": False}, headers=auth)
    assert answer.status_code == 200
    assert answer.get_json() == {"name": "cache", "enabled": False, "source": "redis", "default": True}
    assert services(other).flags.enabled("cache") is False
    assert other.test_client().get("/api/status").get_json()["flags"]["cache"] is False
    assert client.put("/api/admin/flags/cache", json={"enabled": None}, headers=auth).get_json()["enabled"]
    for bad in ({"enabled": "no"}, {}, {"enabled": True, "extra": 1}):
        response = client.put("/api/admin/flags/cache", json=bad, headers=auth)
        assert response.status_code == 400 and response.get_json()["error"] == "invalid_request"
    assert client.put("/api/admin/flags/turbo", json={"enabled": True}, headers=auth).status_code == 404


# -- end to end: a running web process and worker obey a flag set through the admin API ----------


@pytest.fixture(scope="module")
def flag_stack(redis_url, sandbox_url, tmp_path_factory):
    """Web and worker re-reading flags every 0.2 s; ReceitaWS at one call a minute, its bucket
    holding that one call (no batch reserve on top), so the second lookup waits."""
    from stack import started

    limits = {
        **FAST_LIMITS,
        "RATE_LIMIT_RECEITAWS": "1",
        "BATCH_TOKEN_RESERVE": "0",
        "FLAGS_REFRESH_INTERVAL": "0.2",
    }
    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("flags"), **limits) as stack:
        yield stack


def _set_flag(stack, name: str, enabled: bool | None) -> None:
    response = requests.put(
        f"{stack.web_url}/api/admin/flags/{name}", json={"enabled": enabled}, headers=ADMIN, timeout=10
    )
    assert response.status_code == 200, response.text


def test_cache_flag_sends_a_cached_identifier_upstream_without_a_restart(flag_stack, sandbox):
    cep = sandbox.identifiers("cep", 1, seed=301)[0]
    flag_stack.wait_status(flag_stack.post_lookup(cep).json()["id"])
    assert flag_stack.post_lookup(cep).status_code == 200  # cached
    served = sandbox.served("viacep")
    _set_flag(flag_stack, "cache", False)
    try:
        started = wait_for(
            lambda: (r := flag_stack.post_lookup(cep)).status_code == 202 and r.json(),
            timeout=10,
            message="the web process to stop answering from the cache",
        )
        done = flag_stack.wait_status(started["id"])
        assert done["sources"]["viacep"]["state"] == "ok" and done["sources"]["viacep"]["cached"] is False
        assert sandbox.served("viacep") > served
        sandbox.reset()
        company = sandbox.identifiers("cnpj", 1, seed=304)[0]
        done = flag_stack.wait_status(flag_stack.post_lookup(company).json()["id"])
        assert {check["name"] for check in done["checks"]} >= {"cep_valid", "cep_matches_city"}
        stats = sandbox.stats()["upstreams"]
        # One CNPJ call and one CEP call for the cross-check: with nothing cached, a CEP fetched
        # early could not hand its answer on, so none is.
        assert stats["brasilapi"]["requests"] + stats["viacep"]["requests"] == 2, (company, sandbox.get("/_arrivals/brasilapi").text)
    finally:
        _set_flag(flag_stack, "cache", None)
    wait_for(lambda: flag_stack.post_lookup(cep).status_code == 200, timeout=10, message="the cache back")


def test_breaker_flag_lets_calls_through_an_open_breaker_without_a_restart(flag_stack, sandbox):
    first = sandbox.identifiers("cep", 1, seed=302)[0]
    opened = requests.post(f"{flag_stack.web_url}/api/admin/breakers/viacep/open", headers=ADMIN, timeout=10)
    assert opened.status_code == 200
    try:
        done = flag_stack.wait_status(flag_stack.post_lookup(first).json()["id"], ("complete", "partial"))
        assert done["sources"]["viacep"]["state"] == "circuit_open"
        _set_flag(flag_stack, "circuit_breaker", False)
        fresh = iter(sandbox.identifiers("cep", 50, seed=312))
        # The worker re-reads flags within 0.2 s: until then a lookup may still meet the breaker.
        done = wait_for(
            lambda: (
                (
                    d := flag_stack.wait_status(
                        flag_stack.post_lookup(next(fresh)).json()["id"], ("complete", "partial")
                    )
                )["sources"]["viacep"]["state"]
                == "ok"
                and d
            ),
            timeout=15,
            message="a lookup that calls ViaCEP through its open breaker",
        )
        assert done["sources"]["viacep"]["cached"] is False
        assert flag_stack.get("/api/status").json()["breakers"]["viacep"]["state"] == "open"
    finally:
        _set_flag(flag_stack, "circuit_breaker", None)
        requests.post(f"{flag_stack.web_url}/api/admin/breakers/viacep/reset", headers=ADMIN, timeout=10)


def test_rate_limiting_flag_lets_calls_past_an_exhausted_quota_without_a_restart(flag_stack, sandbox):
    first, second = sandbox.identifiers("cnpj", 2, seed=303)
    services(flag_stack.app).rate_limiter.reset("receitaws")
    done = flag_stack.wait_status(flag_stack.post_lookup(first).json()["id"])
    assert done["sources"]["receitaws"]["state"] == "ok"
    waiting = flag_stack.post_lookup(second).json()["id"]
    wait_for(
        lambda: (
            flag_stack.get(f"/api/lookups/{waiting}").json()["sources"]["receitaws"]["state"]
            == "rate_limited"
        ),
        timeout=10,
        message="the second call to wait for ReceitaWS's next slot",
    )
    _set_flag(flag_stack, "rate_limiting", False)
    try:
        fresh = iter(sandbox.identifiers("cnpj", 50, seed=313))
        # A minute before ReceitaWS's next slot; the worker re-reads flags within 0.2 s.
        wait_for(
            lambda: (
                flag_stack.wait_status(
                    flag_stack.post_lookup(next(fresh)).json()["id"], ("complete", "partial")
                )["sources"]["receitaws"]["state"]
                == "ok"
            ),
            timeout=20,
            message="a ReceitaWS call past its exhausted quota",
        )
    finally:
        _set_flag(flag_stack, "rate_limiting", None)
