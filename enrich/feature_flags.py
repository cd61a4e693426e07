"""Runtime feature flags (rate limiting, circuit breakers, cache): kept in Redis, no restart needed.

Each flag's default is a setting (RATE_LIMITING_ENABLED, CIRCUIT_BREAKER_ENABLED, CACHE_ENABLED);
a value set through the admin API or `flask flags set` is stored in one Redis hash and wins over
the default in every process of the cluster.  Processes re-read the hash at most every
FLAGS_REFRESH_INTERVAL seconds (a dict lookup in between: flags are checked on every source call),
so a change is in force everywhere within that interval.  While Redis cannot be read, a process
keeps the values it read last (the settings' defaults if it never read any).
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from enrich import redis_store
from enrich.settings import Settings

log = logging.getLogger("feature_flags")

# Flag name -> the Settings field holding its default.
FLAGS = {
    "rate_limiting": "rate_limiting_enabled",
    "circuit_breaker": "circuit_breaker_enabled",
    "cache": "cache_enabled",
}


FAILURE_BACKOFF = 5.0  # seconds before a process tries Redis again after a failed read


class UnknownFlag(ValueError):
    """A flag name the service does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no feature flag named {name!r} (flags: {', '.join(FLAGS)})")
        self.name = name


class FeatureFlags:
    """The cluster's flags as this process last read them from Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._stored: dict[str, bool] = {}  # values set at run time, as last read
        self._read_at = float("-inf")
        self._warned_at = float("-inf")
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        return redis_store.key(self.settings, "flags")

    def default(self, name: str) -> bool:
        """The flag's value from settings (what it is while nobody set it at run time)."""
        if name not in FLAGS:
            raise UnknownFlag(name)
        return bool(getattr(self.settings, FLAGS[name]))

    def _refresh(self, force: bool = False) -> dict[str, bool]:
        now = time.monotonic()
        if not force and now - self._read_at < self.settings.flags_refresh_interval:
            return self._stored
        with self._lock:
            if not force and now - self._read_at < self.settings.flags_refresh_interval:
                return self._stored
            try:
                raw = self.redis.hgetall(self.key)
            except redis.RedisError as error:
                if now - self._warned_at > 30:
                    log.warning("feature flags unreadable, keeping the last values: %s", error)
                    self._warned_at = now
                # Retried after FAILURE_BACKOFF, not every interval: each try may wait out the socket
                # timeout, which would otherwise add to a request's time once a second per process.
                self._read_at = now + max(0.0, FAILURE_BACKOFF - self.settings.flags_refresh_interval)
                return self._stored
            self._stored = {
                field.decode(): value == b"1" for field, value in raw.items() if field.decode() in FLAGS
            }
            self._read_at = now
            return self._stored

    def enabled(self, name: str) -> bool:
        """Whether the flag is on now (the run-time value if one was set, else its setting)."""
        stored = self._refresh()
        return stored[name] if name in stored else self.default(name)

    def all(self) -> dict[str, dict]:
        """Every flag: enabled, where that comes from (redis or settings), and its default."""
        stored = self._refresh(force=True)
        return {
            name: {
                "enabled": stored.get(name, self.default(name)),
                "source": "redis" if name in stored else "settings",
                "default": self.default(name),
            }
            for name in FLAGS
        }

    def set(self, name: str, value: bool | None) -> dict:
        """Turn a flag on or off for the whole cluster; None drops the run-time value (back to settings)."""
        self.default(name)  # UnknownFlag for a name the service does not have
        if value is None:
            self.redis.hdel(self.key, name)
        else:
            self.redis.hset(self.key, name, "1" if value else "0")
        log.warning("feature flag %s set to %s", name, "default" if value is None else value)
        return self.all()[name]
