"""Versioned Redis cache of source answers: one entry per (type, source, identifier).

Keys carry the schema version and a runtime generation counter, so bumping the generation
invalidates everything at once without scanning; older generations are swept by beat's cleanup.
Each entry is stored for `cache_stale_ttl` beyond its fresh TTL and carries the time it was
fetched: young enough is a hit, older is a stale copy kept for when a source's breaker is open.

Lookup records name the entries whose data they show instead of copying it (enrich/lookups.py):
an entry's version is its generation and a digest of the entry as stored (`EntryVersion`).  So
that a record can read its data for as long as it lives, an entry with data that the cache
replaces (a refetch, `refresh`) or removes (an invalidation, an old generation's sweep) is kept
under `cache:kept:{type}:{source}:{identifier}:{digest}` for what was left of its TTL, at most
`LOOKUP_RECORD_TTL` (no record outlives that); a record names an entry only while the entry (or
its kept copy) lives at least as long as the record, and copies it otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import redis

from enrich import metrics, redis_store
from enrich.feature_flags import FeatureFlags
from enrich.near_cache import FLUSH, NearCache
from enrich.settings import Settings

log = logging.getLogger("cache")

SCHEMA_VERSION = 1
KEPT = "kept"  # the key family of entries kept for the records that name them


def entry_key(
    settings: Settings, schema: int, generation: int, kind: str, source: str, identifier: str
) -> str:
    """The key of a cache entry: {p}:cache:v{schema}:g{generation}:{type}:{source}:{identifier}."""
    return redis_store.key(settings, "cache", f"v{schema}", f"g{generation}", kind, source, identifier)


def kept_key(settings: Settings, kind: str, source: str, identifier: str, digest: str) -> str:
    """Where an entry replaced or removed while records may name it is kept (`_RETIRE`)."""
    return redis_store.key(settings, "cache", KEPT, kind, source, identifier, digest)


def digest_of(raw: bytes) -> str:
    """An entry's version as stored: the first 16 hex digits of its SHA-1 (`_RETIRE` computes the
    same in Lua).  Not a security measure: it tells apart the versions of one entry."""
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:16]


class EntryVersion(NamedTuple):
    """One version of one cache entry, as a lookup record names it: its key's schema, generation,
    type, source and identifier, and the digest of its content.  `raw` (the entry as stored) is
    there when this process read or wrote it: a record names a version only by showing Redis that
    content (LookupStore); `known_digest` when read back from a record.  A tuple: the cached path
    makes one per entry it reads, and hashes it only when a record names it."""

    schema: int
    generation: int
    kind: str
    source: str
    identifier: str
    raw: bytes | None = None
    known_digest: str | None = None

    @property
    def digest(self) -> str:
        return self.known_digest or digest_of(self.raw or b"")

    @property
    def ref(self) -> str:
        """How a record names it (with its type, source and identifier): `schema.generation.digest`."""
        return f"{self.schema}.{self.generation}.{self.digest}"

    @classmethod
    def from_ref(cls, ref: str, kind: str, source: str, identifier: str) -> EntryVersion:
        schema, generation, digest = ref.split(".")
        return cls(int(schema), int(generation), kind, source, identifier, known_digest=digest)

    def keys(self, settings: Settings) -> tuple[str, str]:
        """The entry's key and its kept copy's key: the version is under one or the other."""
        return (
            entry_key(settings, self.schema, self.generation, self.kind, self.source, self.identifier),
            kept_key(settings, self.kind, self.source, self.identifier, self.digest),
        )

    def data_from(self, entry: bytes | None, kept: bytes | None) -> tuple[bool, dict | None]:
        """(found, its data) from what its two keys hold; found is False when neither holds it."""
        if entry is not None and digest_of(entry) == self.digest:
            return True, orjson.loads(entry)["data"]
        if kept is not None:
            return True, orjson.loads(kept)["data"]
        return False, None


_new_tuple = tuple.__new__

# A found entry as stored starts so (orjson writes no spaces, the fields in `Cache.set`'s order):
# both scripts get it as an argument, to tell an entry with data from a "not found".
_FOUND = b'{"found":true,'

# Both scripts name the kept copy's key themselves (its digest is known only inside): fine on one
# Redis, which is all the service supports (docs/architecture.md: no Redis Cluster).  Passing it in
# KEYS would take a GET of the old entry first (its digest), a second round trip on every write:
# neither the caller nor the near cache knows the old version in the common case (a worker's write
# after a miss it did not read itself), so the write would no longer be one EVALSHA.  `_RETIRE`
# (invalidations and sweeps, off the hot path) could afford that read, but would need the same
# compare-and-retry for an entry rewritten between the read and the script: not done for now.
# KEYS[1] an entry.  ARGV: its new content, its TTL (s), its kept copies' key prefix
# ({p}:cache:kept:{type}:{source}:{identifier}:), the longest a copy is kept (ms), how a found
# entry starts (`_FOUND`), the near caches' channel.  An entry with data that other content
# replaces is kept first, for what was left of its TTL (at most that); then the write is announced.
_SET = """
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[1] and string.sub(old, 1, #ARGV[5]) == ARGV[5] then
  local keep = math.min(redis.call('PTTL', KEYS[1]), tonumber(ARGV[4]))
  local kept = ARGV[3] .. string.sub(redis.sha1hex(old), 1, 16)
  if keep > 0 and redis.call('PTTL', kept) < keep then redis.call('SET', kept, old, 'PX', keep) end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', ARGV[6], KEYS[1])
"""

# KEYS: entries to remove.  ARGV: the kept copies' key prefix ({p}:cache:kept:), the longest a copy
# is kept (ms), how a found entry starts (`_FOUND`).  Each entry with data moves to its kept copy
# for what was left of its TTL (at most that); returns how many entries were removed.
_RETIRE = """
local removed = 0
for _, key in ipairs(KEYS) do
  local old = redis.call('GET', key)
  if old then
    local keep = math.min(redis.call('PTTL', key), tonumber(ARGV[2]))
    local kept = ARGV[1] .. string.match(key, '([^:]+:[^:]+:[^:]+)$') .. ':' .. string.sub(redis.sha1hex(old), 1, 16)
    if string.sub(old, 1, #ARGV[3]) == ARGV[3] and keep > 0 and redis.call('PTTL', kept) < keep then
      redis.call('RENAME', key, kept)
      redis.call('PEXPIRE', kept, keep)
    else
      redis.call('DEL', key)
    end
    removed = removed + 1
  end
end
return removed
"""


@dataclass(frozen=True)
class CacheEntry:
    """One cached source answer: `found` False is a cached "not found"."""

    source: str
    found: bool
    data: dict | None
    fetched_at: float
    stale: bool = False
    # The version it was read from (a lookup record names it instead of copying the data).
    origin: EntryVersion | None = field(default=None, compare=False, repr=False)

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
        self._set_script = client.register_script(_SET)
        self._retire_script = client.register_script(_RETIRE)

    def _key(self, *parts: object) -> str:
        return redis_store.key(self.settings, "cache", *parts)

    def _entry_key(self, generation: int, identifier_type: str, source: str, identifier: str) -> str:
        return entry_key(self.settings, SCHEMA_VERSION, generation, identifier_type, source, identifier)

    def _keep_ms(self) -> int:
        """The longest an entry is kept for the records naming it: no record outlives LOOKUP_RECORD_TTL."""
        return int(self.settings.lookup_record_ttl * 1000)

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
            generation, raw_values = self._read(keys)
        except redis.RedisError as error:
            log.warning("cache read failed, treating as a miss: %s", error)
            return [{} for _ in requests]
        values = iter(raw_values)
        now = time.time()
        answers = []
        for identifier_type, sources, identifier in requests:
            entries: dict[str, CacheEntry] = {}
            for source in sources:
                raw = next(values)
                if raw is None:
                    continue
                stored = orjson.loads(raw)
                fresh = now - stored["fetched_at"] < self._fresh_ttl(identifier_type, stored["found"])
                if fresh or allow_stale:
                    entries[source] = CacheEntry(
                        source,
                        stored["found"],
                        stored["data"],
                        stored["fetched_at"],
                        stale=not fresh,
                        # tuple.__new__: half the time of EntryVersion(...), on the cached path
                        origin=_new_tuple(
                            EntryVersion,
                            (SCHEMA_VERSION, generation, identifier_type, source, identifier, raw, None),
                        ),
                    )
            stale = sum(e.stale for e in entries.values())
            self._count(hits=len(entries) - stale, misses=len(sources) - len(entries), stale=stale)
            metrics.cache_read(identifier_type, len(entries) - stale, len(sources) - len(entries), stale)
            answers.append(entries)
        return answers

    def _read(self, keys: list[tuple[str, str, str]]) -> tuple[int, list[bytes | None]]:
        """The generation and the raw (type, source, identifier) entries under it: all from the
        near cache when it holds every one, else one MGET that refills it."""
        near = self.near
        if near is not None and near.live:
            generation = near.generation()
            if generation is not None:
                values = [near.get(self._entry_key(generation, *key)) for key in keys]
                if None not in values:
                    if time.monotonic() - self._counts_written_at > 1.0:
                        self.flush_counts()  # the counters' ride (no Redis read) comes once a second
                    return generation, [value or None for value in values]  # b"": known to be absent
        stamp = near.stamp() if near is not None else 0
        generation, values = self._read_redis(keys)
        if near is not None:
            near.set_generation(generation, stamp)
            for key, value in zip(keys, values, strict=True):
                # Absent keys too (as b""): a write announces its key, which drops that as well.
                near.put(self._entry_key(generation, *key), value or b"", stamp)
        return generation, values

    def _read_redis(self, keys: list[tuple[str, str, str]]) -> tuple[int, list[bytes | None]]:
        """The current generation and the MGET of (type, source, identifier) entries under it."""
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
        return generation, values

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
    ) -> EntryVersion | None:
        """Store a source answer; kept `cache_stale_ttl` beyond its fresh TTL as a stale copy.

        Returns the version written (what a lookup record names for this data), None when the cache
        is off.  The entry it replaces, if it had data, is kept for the records that may name it;
        the write is announced to the near caches by the same script (`_SET`): one round trip.
        """
        if not self.enabled:
            return None
        entry = {"found": found, "data": data, "fetched_at": time.time()}
        ttl = self._fresh_ttl(identifier_type, found) + self.settings.cache_stale_ttl
        # The near cache knows the generation while its subscription is live (a bump flushes it),
        # which saves a round trip per write; otherwise it is read.
        generation = self.near.generation() if self.near is not None else None
        if generation is None:
            generation = self.generation()
        key = self._entry_key(generation, identifier_type, source, identifier)
        raw = orjson.dumps(entry)
        kept = kept_key(self.settings, identifier_type, source, identifier, "")
        # Called directly (EVALSHA, loading itself on NOSCRIPT): a Script in a pipeline costs an
        # extra SCRIPT EXISTS round trip (redis-py's Pipeline.load_scripts).
        channel = self._key("invalidations")
        self._set_script(keys=[key], args=[raw, ttl, kept, self._keep_ms(), _FOUND, channel])
        if self.near is not None:
            self.near.forget(key)
        return EntryVersion(SCHEMA_VERSION, generation, identifier_type, source, identifier, raw)

    def invalidate(
        self, identifier_type: str, identifier: str | None = None, source: str | None = None
    ) -> int:
        """Remove one identifier's entries (all its sources, or one) or a whole type; returns the
        count.  Those with data are kept for the records that may name them (`_RETIRE`)."""
        pattern = self._entry_key(self.generation(), identifier_type, source or "*", identifier or "*")
        return self._delete_matching(pattern, retire=True)

    def purge_type(self, identifier_type: str) -> int:
        """Delete a type's entries of every schema and generation, and their kept copies (beat's
        cleanup: a CPF, which this version never caches, left by an earlier one; its records go
        with them, LookupStore.purge_type); announces nothing when there were none."""
        deleted = self._delete_matching(self._key("v*", "g*", identifier_type, "*"), announce_none=False)
        return deleted + self._delete_matching(self._key(KEPT, identifier_type, "*"), announce_none=False)

    def _delete_matching(self, pattern: str, announce_none: bool = True, retire: bool = False) -> int:
        """Delete the keys matching `pattern` (`retire`: entries, those with data kept for the records
        naming them); near caches drop everything (`announce_none`: even when nothing matched)."""
        deleted = 0
        batch: list[bytes] = []

        def remove(keys: list[bytes]) -> int:
            if retire:
                return int(
                    self._retire_script(keys=keys, args=[self._key(KEPT, ""), self._keep_ms(), _FOUND])
                )
            return self.redis.unlink(*keys)

        for key in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += remove(batch)
                batch.clear()
        if batch:
            deleted += remove(batch)
        if not deleted and not announce_none:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            self._announce(pipe, FLUSH)  # near caches drop everything
            pipe.execute()
        return deleted

    def delete_old_generations(self) -> int:
        """Sweep entries of generations before the current one (beat's cleanup); those with data are
        kept for the records that may name them (`_RETIRE`)."""
        current = self.generation()
        deleted = 0
        for generation in range(current):
            pattern = self._key(f"v{SCHEMA_VERSION}", f"g{generation}", "*")
            deleted += self._delete_matching(pattern, retire=True)
        for version in range(1, SCHEMA_VERSION):
            deleted += self._delete_matching(self._key(f"v{version}", "*"), retire=True)
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
