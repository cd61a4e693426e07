"""The versioned cache against a real Redis: generations, TTLs, invalidation, stats, Redis down."""

from __future__ import annotations

import time

import pytest

from cache_manager import Cache
from enrich.settings import Settings


@pytest.fixture
def cache(settings, redis_client) -> Cache:
    return Cache(redis_client, settings)


def test_set_then_get_returns_fresh_entry(cache):
    cache.set("cnpj", "brasilapi", "11222333000181", {"razao_social": "ACME"})
    entry = cache.get("cnpj", "brasilapi", "11222333000181")
    assert entry is not None and entry.found and not entry.stale
    assert entry.data == {"razao_social": "ACME"}


def test_get_many_returns_only_cached_sources(cache):
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 1})
    entries = cache.get_many("cnpj", ["brasilapi", "receitaws", "opencnpj"], "11222333000181")
    assert list(entries) == ["brasilapi"]


def test_not_found_answers_are_cached_with_their_own_ttl(cache, redis_client):
    cache.set("cnpj", "brasilapi", "11222333000181", None, found=False)
    entry = cache.get("cnpj", "brasilapi", "11222333000181")
    assert entry is not None and not entry.found
    key = next(redis_client.scan_iter(match=f"{cache.settings.key_prefix}:cache:v*"))
    ttl = redis_client.ttl(key)
    expected = cache.settings.cache_not_found_ttl + cache.settings.cache_stale_ttl
    assert expected - 5 <= ttl <= expected


def test_per_type_ttls_set_the_key_expiry(cache, redis_client, settings):
    for kind, value in (("cnpj", "11222333000181"), ("cep", "01310100")):  # a CPF is never cached
        cache.set(kind, "brasilapi", value, {"x": 1})
        key = next(redis_client.scan_iter(match=f"{settings.key_prefix}:cache:v*:{kind}:*"))
        expected = settings.cache_ttl(kind) + settings.cache_stale_ttl
        assert expected - 5 <= redis_client.ttl(key) <= expected


def test_entry_past_its_fresh_ttl_is_a_miss_but_a_stale_copy(redis_url, redis_client):
    settings = Settings.from_env({}, redis_url=redis_url, key_prefix="tstale", cache_ttl_cep=1)
    cache = Cache(redis_client, settings)
    cache.set("cep", "viacep", "01310100", {"municipio": "São Paulo"})
    assert cache.get("cep", "viacep", "01310100") is not None
    deadline = time.time() + 1.1
    while time.time() < deadline:  # the entry ages by wall clock; wait until it is past 1 s old
        time.sleep(0.05)
    assert cache.get("cep", "viacep", "01310100") is None
    stale = cache.get_stale("cep", "viacep", "01310100")
    assert stale is not None and stale.stale and stale.data == {"municipio": "São Paulo"}
    redis_client.delete(*redis_client.keys("tstale:*"))


def test_generation_bump_invalidates_everything_at_once(cache):
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 1})
    cache.set("cep", "viacep", "01310100", {"b": 2})
    assert cache.bump_generation() == 1
    assert cache.get("cnpj", "brasilapi", "11222333000181") is None
    assert cache.get("cep", "viacep", "01310100") is None
    cache.set("cep", "viacep", "01310100", {"b": 3})
    assert cache.get("cep", "viacep", "01310100").data == {"b": 3}


def test_old_generations_are_swept(cache, redis_client, settings):
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 1})
    cache.bump_generation()
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 2})
    assert cache.delete_old_generations() == 1
    remaining = list(redis_client.scan_iter(match=f"{settings.key_prefix}:cache:v*"))
    assert len(remaining) == 1 and b":g1:" in remaining[0]


def test_invalidate_one_identifier_keeps_the_others(cache):
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 1})
    cache.set("cnpj", "receitaws", "11222333000181", {"a": 1})
    cache.set("cnpj", "brasilapi", "27865757000102", {"a": 2})
    assert cache.invalidate("cnpj", "11222333000181") == 2
    assert cache.get("cnpj", "brasilapi", "27865757000102") is not None


def test_invalidate_a_type_keeps_other_types(cache):
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 1})
    cache.set("cep", "viacep", "01310100", {"b": 2})
    assert cache.invalidate("cnpj") == 1
    assert cache.get("cep", "viacep", "01310100") is not None


def test_stats_count_hits_misses_and_keys(cache):
    cache.set("cnpj", "brasilapi", "11222333000181", {"a": 1})
    cache.get("cnpj", "brasilapi", "11222333000181")
    cache.get("cnpj", "receitaws", "11222333000181")
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["hit_rate"] == 0.5
    assert stats["keys"] == 1 and stats["used_memory_bytes"] > 0
