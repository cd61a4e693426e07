"""In-process near cache of cache entries, kept honest by invalidation messages from Redis.

A cached lookup is answered from this process's memory instead of a Redis round trip.  Every
write to the cache (`cache_manager`) publishes the key it changed (or `*` for a generation bump
or a bulk invalidation) on one channel; each process holding a near cache subscribes to it and
drops what changed.

Hand-written because the library route is closed here: redis-py's client-side caching (RESP3
CLIENT TRACKING) refuses Valkey 8.1 and Redis before 7.4, which the service must run on.  The
rules that keep it correct:

- It serves nothing unless its subscription is live: while disconnected, and after every
  (re)subscribe, it starts empty, since messages may have been missed in between.
- A value read from Redis is stored only if no invalidation of that key (nor a flush) has
  arrived since the read began (`stamp()` before the read, `put(..., stamp)` after), so a write
  racing the read never leaves the old value behind.
- An entry lives at most `max_age` seconds whatever happens, bounding the damage of a message
  lost in a way the subscription did not notice; the cache's own freshness rules still apply
  to what it returns.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from enrich import redis_store
from enrich.settings import Settings

log = logging.getLogger("near_cache")

FLUSH = b"*"
# Keys last invalidated are remembered up to this many; past it the memory is reset and every
# read older than the reset counts as raced (a few puts are skipped, nothing wrong is kept).
INVALIDATION_MEMORY = 50_000


class NearCache:
    """Bounded map of cache key -> raw entry bytes, plus the generation, for one process."""

    def __init__(self, settings: Settings, size: int, max_age: float) -> None:
        self.settings = settings
        self.size = size
        self.max_age = max_age
        self.channel = redis_store.key(settings, "cache", "invalidations")
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, bytes]] = {}
        self._generation: int | None = None
        self._sequence = 0  # invalidations received so far
        self._invalidated: dict[str, int] = {}  # key -> sequence of its last invalidation
        self._floor = 0  # a flush: nothing read before this sequence may be stored
        self._live = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.hits = 0
        self.flushes = 0

    # -- reading and filling ---------------------------------------------------------------

    @property
    def live(self) -> bool:
        self._ensure_running()
        return self._live.is_set()

    def stamp(self) -> int:
        """Take before reading Redis; hand to `put` and `set_generation` after."""
        return self._sequence

    def generation(self) -> int | None:
        """The cache generation as last read, or None when unknown (then read it from Redis)."""
        return self._generation if self.live else None

    def set_generation(self, generation: int, stamp: int) -> None:
        with self._lock:
            if self._live.is_set() and stamp >= self._floor:
                self._generation = generation

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None or not self._live.is_set():
            return None
        if time.monotonic() - entry[0] > self.max_age:
            self._entries.pop(key, None)
            return None
        self.hits += 1
        return entry[1]

    def put(self, key: str, raw: bytes, stamp: int) -> None:
        """Keep a value read from Redis after `stamp()`, unless the key changed since."""
        with self._lock:
            if not self._live.is_set() or stamp < self._floor or self._invalidated.get(key, -1) > stamp:
                return
            if len(self._entries) >= self.size:
                # Drop the oldest tenth (dicts keep insertion order): cheap and good enough for a
                # cache of hot identifiers that refills from Redis in one round trip.
                for old in list(self._entries)[: max(1, self.size // 10)]:
                    del self._entries[old]
            self._entries[key] = (time.monotonic(), raw)

    def stats(self) -> dict:
        return {
            "entries": len(self._entries),
            "hits": self.hits,
            "live": self._live.is_set(),
            "flushes": self.flushes,
        }

    # -- invalidation ------------------------------------------------------------------------

    def forget(self, key: str | bytes) -> None:
        """This process changed `key` (or `*`): drop it now rather than when its message comes back."""
        self._invalidate(key if isinstance(key, bytes) else key.encode())

    def _invalidate(self, key: bytes) -> None:
        with self._lock:
            self._sequence += 1
            if key == FLUSH:
                self._flush_locked()
                return
            name = key.decode()
            self._entries.pop(name, None)
            if len(self._invalidated) >= INVALIDATION_MEMORY:
                self._invalidated.clear()
                self._floor = self._sequence
            self._invalidated[name] = self._sequence

    def _flush_locked(self) -> None:
        self._entries.clear()
        self._invalidated.clear()
        self._generation = None
        self._floor = self._sequence
        self.flushes += 1

    def _reset(self, live: bool) -> None:
        with self._lock:
            self._sequence += 1
            self._flush_locked()
            if live:
                self._live.set()
            else:
                self._live.clear()

    def stop(self) -> None:
        self._stopping.set()

    def _ensure_running(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()  # a forked child subscribes on its own
            self._live.clear()
            self._thread = threading.Thread(target=self._run, name="near-cache", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        redis_store.follow_channel(
            self.settings, self.channel, self._stopping, self._invalidate, self._subscribed, self._lost
        )
        self._reset(live=False)

    def _subscribed(self) -> None:
        self._reset(live=True)  # invalidations may have been missed: start empty

    def _lost(self, error: Exception, backoff: float) -> None:
        self._reset(live=False)
        if backoff == 0.05:  # once per outage, not at every retry
            log.warning("near cache lost Redis (%s); serving from Redis only, retrying", error)
