"""Versioned Redis cache of source answers: one entry per (type, source, identifier).

Keys carry the schema version and a runtime generation counter, so bumping the generation
invalidates everything at once without scanning; older generations are swept by beat's cleanup.
Each entry is stored for `cache_stale_ttl` beyond its fresh TTL and carries the time it was
fetched: young enough is a hit, older is a stale copy kept for when a source's breaker is open.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from enrich import metrics, redis_store
from enrich.feature_flags import FeatureFlags
from enrich.near_cache import FLUSH, NearCache
from enrich.settings import Settings

log = logging.getLogger("cache")

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CacheEntry:
    """One cached source answer: `found` False is a cached "not found"."""

    source: str
    found: bool
    data: dict | None
    fetched_at: float
    stale: bool = False

    def age(self, now: float | None = None) -> float:
        return (now or time.time()) - self.fetched_at

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "found": self.found,
            "data": self.data,
            "fetched_at": self.fetched_at,
            "stale": self.stale,
        }


class Cache:
    """The versioned cache; a Redis error on read is a miss, never an exception."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        near: NearCache | None = None,
        flags: FeatureFlags | None = None,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.near = near
        self.flags = flags
        self._lock = threading.Lock()
        self._last_generation = 0
        self._pending_counts: dict[str, int] = {}
        self._counts_written_at = time.monotonic()

    def _key(self, *parts: object) -> str:
        return redis_store.key(self.settings, "cache", *parts)

    def _entry_key(self, generation: int, identifier_type: str, source: str, identifier: str) -> str:
        return self._key(f"v{SCHEMA_VERSION}", f"g{generation}", identifier_type, source, identifier)

    def generation(self) -> int:
        """The current generation (0 until first bumped)."""
        return int(self.redis.get(self._key("generation")) or 0)

    @property
    def enabled(self) -> bool:
        """The `cache` feature flag: while off, every read misses and nothing is written."""
        return self.flags is None or self.flags.enabled("cache")

    def _announce(self, pipe: redis.client.Pipeline, key: str | bytes) -> None:
        """Tell every process's near cache that `key` changed (`*`: everything did); this one's at once."""
        pipe.publish(self._key("invalidations"), key)
        if self.near is not None:
            self.near.forget(key)

    def bump_generation(self) -> int:
        """Invalidate every entry at once; returns the new generation."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(self._key("generation"))
            self._announce(pipe, FLUSH)
            generation = int(pipe.execute()[0])
        log.info("cache generation bumped to %d", generation)
        return generation

    def _fresh_ttl(self, identifier_type: str, found: bool) -> int:
        return self.settings.cache_ttl(identifier_type) if found else self.settings.cache_not_found_ttl

    def get_many(
        self, identifier_type: str, sources: list[str], identifier: str, allow_stale: bool = False
    ) -> dict[str, CacheEntry]:
        """Fresh entries (and stale ones too with `allow_stale`) by source; missing sources are absent."""
        return self.read([(identifier_type, sources, identifier)], allow_stale)[0]

    def read(
        self, requests: list[tuple[str, list[str], str]], allow_stale: bool = False
    ) -> list[dict[str, CacheEntry]]:
        """Several `get_many`s, each a (type, sources, identifier), in one round trip.

        The generation and the entries under the generation seen last are read together (with the
        previous read's counters); only right after a bump is a second read needed.
        """
        keys = [(kind, source, identifier) for kind, sources, identifier in requests for source in sources]
        if not keys or not self.enabled:
            return [{} for _ in requests]
        try:
            values = iter(self._read(keys))
        except redis.RedisError as error:
            log.warning("cache read failed, treating as a miss: %s", error)
            return [{} for _ in requests]
        now = time.time()
        answers = []
        for identifier_type, sources, _ in requests:
            entries: dict[str, CacheEntry] = {}
            for source in sources:
                raw = next(values)
                if raw is None:
                    continue
                stored = orjson.loads(raw)
                fresh = now - stored["fetched_at"] < self._fresh_ttl(identifier_type, stored["found"])
                if fresh or allow_stale:
                    entries[source] = CacheEntry(
                        source, stored["found"], stored["data"], stored["fetched_at"], stale=not fresh
                    )
            stale = sum(e.stale for e in entries.values())
            self._count(hits=len(entries) - stale, misses=len(sources) - len(entries), stale=stale)
            metrics.cache_read(identifier_type, len(entries) - stale, len(sources) - len(entries), stale)
            answers.append(entries)
        return answers

    def _read(self, keys: list[tuple[str, str, str]]) -> list[bytes | None]:
        """The raw (type, source, identifier) entries under the current generation: all from the
        near cache when it holds every one, else one MGET that refills it."""
        near = self.near
        if near is not None and near.live:
            generation = near.generation()
            if generation is not None:
                values = [near.get(self._entry_key(generation, *key)) for key in keys]
                if None not in values:
                    if time.monotonic() - self._counts_written_at > 1.0:
                        self.flush_counts()  # the counters' ride (no Redis read) comes once a second
                    return [value or None for value in values]  # b"": known to be absent
        stamp = near.stamp() if near is not None else 0
        values = self._read_redis(keys)
        if near is not None:
            generation = self._last_generation
            near.set_generation(generation, stamp)
            for key, value in zip(keys, values, strict=True):
                # Absent keys too (as b""): a write announces its key, which drops that as well.
                near.put(self._entry_key(generation, *key), value or b"", stamp)
        return values

    def _read_redis(self, keys: list[tuple[str, str, str]]) -> list[bytes | None]:
        """MGET of (type, source, identifier) entries under the current generation."""
        with self._lock:
            assumed, pending = self._last_generation, self._pending_counts
            self._pending_counts = {}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._key("generation"))
            pipe.mget([self._entry_key(assumed, *key) for key in keys])
            for field, amount in pending.items():
                pipe.hincrby(self._key("stats"), field, amount)
            raw_generation, values, *_ = pipe.execute()
        self._counts_written_at = time.monotonic()
        generation = int(raw_generation or 0)
        if generation != assumed:  # bumped since this process last looked
            self._last_generation = generation
            values = self.redis.mget([self._entry_key(generation, *key) for key in keys])
        return values

    def get(
        self, identifier_type: str, source: str, identifier: str, allow_stale: bool = False
    ) -> CacheEntry | None:
        """One entry, or None."""
        return self.get_many(identifier_type, [source], identifier, allow_stale).get(source)

    def get_stale(self, identifier_type: str, source: str, identifier: str) -> CacheEntry | None:
        """Any copy still kept, fresh or stale (the breaker fallback); marked stale if past its TTL."""
        return self.get(identifier_type, source, identifier, allow_stale=True)

    def set(
        self, identifier_type: str, source: str, identifier: str, data: dict | None, found: bool = True
    ) -> None:
        """Store a source answer; kept `cache_stale_ttl` beyond its fresh TTL as a stale copy."""
        if not self.enabled:
            return
        entry = {"found": found, "data": data, "fetched_at": time.time()}
        ttl = self._fresh_ttl(identifier_type, found) + self.settings.cache_stale_ttl
        # The near cache knows the generation while its subscription is live (a bump flushes it),
        # which saves a round trip per write; otherwise it is read.
        generation = self.near.generation() if self.near is not None else None
        if generation is None:
            generation = self.generation()
        key = self._entry_key(generation, identifier_type, source, identifier)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(key, orjson.dumps(entry), ex=ttl)
            self._announce(pipe, key)
            pipe.execute()

    def invalidate(
        self, identifier_type: str, identifier: str | None = None, source: str | None = None
    ) -> int:
        """Delete one identifier's entries (all its sources, or one) or a whole type; returns the count."""
        pattern = self._entry_key(self.generation(), identifier_type, source or "*", identifier or "*")
        return self._delete_matching(pattern)

    def purge_type(self, identifier_type: str) -> int:
        """Delete a type's entries of every schema and generation (beat's cleanup: a CPF, which this
        version never caches, left by an earlier one); announces nothing when there were none."""
        return self._delete_matching(self._key("v*", "g*", identifier_type, "*"), announce_none=False)

    def _delete_matching(self, pattern: str, announce_none: bool = True) -> int:
        """Delete the keys matching `pattern`; near caches drop everything (`announce_none`: even
        when nothing matched)."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += self.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += self.redis.unlink(*batch)
        if not deleted and not announce_none:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            self._announce(pipe, FLUSH)  # near caches drop everything
            pipe.execute()
        return deleted

    def delete_old_generations(self) -> int:
        """Sweep entries of generations before the current one (beat's cleanup)."""
        current = self.generation()
        deleted = 0
        for generation in range(current):
            deleted += self._delete_matching(self._key(f"v{SCHEMA_VERSION}", f"g{generation}", "*"))
        for version in range(1, SCHEMA_VERSION):
            deleted += self._delete_matching(self._key(f"v{version}", "*"))
        return deleted

    def _count(self, hits: int = 0, misses: int = 0, stale: int = 0) -> None:
        """Counters ride along with this process's next cache read (no round trip of their own)."""
        with self._lock:
            for field, amount in (("hits", hits), ("misses", misses), ("stale", stale)):
                if amount:
                    self._pending_counts[field] = self._pending_counts.get(field, 0) + amount

    def flush_counts(self) -> None:
        """Write the counters still waiting for a read (stats() does it first)."""
        with self._lock:
            pending, self._pending_counts = self._pending_counts, {}
        self._counts_written_at = time.monotonic()
        if not pending:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for field, amount in pending.items():
                    pipe.hincrby(self._key("stats"), field, amount)
                pipe.execute()
        except redis.RedisError:
            pass  # counters are best effort; a lookup must not fail for them

    def counts(self) -> dict[str, int]:
        """The cluster-wide hits, misses and stale serves (this process's pending ones written first)."""
        self.flush_counts()
        raw = self.redis.hgetall(self._key("stats"))
        return {k.decode(): int(v) for k, v in raw.items()}

    def stats(self) -> dict[str, Any]:
        """Hits, misses, stale serves, hit rate, current-generation key count and Redis memory."""
        counts = self.counts()
        hits, misses = counts.get("hits", 0), counts.get("misses", 0)
        generation = self.generation()
        keys = sum(
            1
            for _ in self.redis.scan_iter(
                match=self._key(f"v{SCHEMA_VERSION}", f"g{generation}", "*"), count=1000
            )
        )
        memory = self.redis.info("memory")
        return {
            "generation": generation,
            "schema_version": SCHEMA_VERSION,
            "hits": hits,
            "misses": misses,
            "stale": counts.get("stale", 0),
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "keys": keys,
            "used_memory_bytes": memory.get("used_memory"),
            "used_memory_human": memory.get("used_memory_human"),
            "near_cache": self.near.stats() if self.near is not None else None,
        }
