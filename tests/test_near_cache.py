"""The in-process near cache: served without Redis, invalidated by other processes' writes, never stale after a lost subscription."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import wait_for

from cache_manager import Cache
from enrich import redis_store
from enrich.near_cache import NearCache

CNPJ = "11222333000181"


@pytest.fixture
def caches(settings, redis_client):
    """Two processes' caches on one Redis: `near` has a near cache, `other` writes like a worker."""
    near = NearCache(settings, size=100, max_age=30)
    with_near = Cache(redis_store.connect(settings), settings, near)
    other = Cache(redis_store.connect(settings), settings)
    wait_for(lambda: near.live, timeout=5, message="near cache subscription")
    yield with_near, other
    near.stop()
    with_near.redis.close()
    other.redis.close()


def _name(cache: Cache) -> str | None:
    entry = cache.get("cnpj", "brasilapi", CNPJ)
    return entry.data["razao_social"] if entry else None


def _mget_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


def _write_elsewhere(cache: Cache, other: Cache, name: str) -> None:
    """`other` writes; wait until `cache` has heard of it (a later message would drop a fresh copy)."""
    heard = cache.near.stamp()
    other.set("cnpj", "brasilapi", CNPJ, {"razao_social": name})
    wait_for(lambda: cache.near.stamp() > heard, timeout=5, message="the invalidation message")


def test_a_repeated_read_is_served_from_memory_without_redis(caches, redis_client):
    cache, other = caches
    _write_elsewhere(cache, other, "ACME")
    assert _name(cache) == "ACME"  # read from Redis, kept in memory
    before = _mget_calls(redis_client)
    for _ in range(20):
        assert _name(cache) == "ACME"
    assert _mget_calls(redis_client) == before
    assert cache.near.hits >= 20


def test_another_process_writing_the_key_invalidates_the_copy(caches):
    cache, other = caches
    _write_elsewhere(cache, other, "ACME")
    assert _name(cache) == "ACME"
    other.set("cnpj", "brasilapi", CNPJ, {"razao_social": "ACME NOVA"})
    wait_for(lambda: _name(cache) == "ACME NOVA", timeout=5, message="the new value after invalidation")


def test_a_generation_bump_elsewhere_flushes_everything(caches):
    cache, other = caches
    _write_elsewhere(cache, other, "ACME")
    assert _name(cache) == "ACME"
    other.bump_generation()
    wait_for(lambda: _name(cache) is None, timeout=5, message="a miss after the bump")


def test_an_own_write_is_seen_at_once(caches):
    cache, _ = caches
    cache.set("cnpj", "brasilapi", CNPJ, {"razao_social": "ACME"})
    assert _name(cache) == "ACME"
    cache.set("cnpj", "brasilapi", CNPJ, {"razao_social": "OUTRA"})
    assert _name(cache) == "OUTRA"  # no wait for the message to come back


def test_a_value_read_before_a_racing_write_is_not_kept(settings):
    near = NearCache(settings, size=10, max_age=30)
    try:
        wait_for(lambda: near.live, timeout=5, message="near cache subscription")
        stamp = near.stamp()  # a read begins...
        near.forget("k")  # ...another write's invalidation arrives before the read's answer
        near.put("k", b"old", stamp)
        assert near.get("k") is None
        near.put("k", b"new", near.stamp())
        assert near.get("k") == b"new"
    finally:
        near.stop()


def test_a_lost_subscription_serves_nothing_from_memory_until_renewed(caches, redis_client):
    cache, other = caches
    _write_elsewhere(cache, other, "ACME")
    assert _name(cache) == "ACME"
    assert cache.near.stats()["entries"] == 1
    flushes = cache.near.flushes
    redis_client.client_kill_filter(_type="pubsub")  # messages sent meanwhile would be missed
    wait_for(lambda: cache.near.flushes > flushes, timeout=10, message="the near cache to reset")
    assert cache.near.stats()["entries"] == 0
    wait_for(lambda: cache.near.live, timeout=10, message="the subscription to come back")
    assert _name(cache) == "ACME"  # from Redis again, then from memory


def test_entries_older_than_max_age_are_read_again(settings, redis_client):
    near = NearCache(dataclasses.replace(settings), size=10, max_age=0)
    cache = Cache(redis_store.connect(settings), settings, near)
    try:
        wait_for(lambda: near.live, timeout=5, message="near cache subscription")
        cache.set("cnpj", "brasilapi", CNPJ, {"razao_social": "ACME"})
        before = _mget_calls(redis_client)
        assert _name(cache) == "ACME"
        assert _name(cache) == "ACME"
        assert _mget_calls(redis_client) == before + 2
    finally:
        near.stop()
        cache.redis.close()
