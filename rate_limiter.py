"""Cluster-wide token buckets, one per source, shared by every worker process through Redis.

Hand-written because no library does this well here: Celery's `rate_limit` is per worker
(celery/celery#5927) and flask-limiter limits incoming requests, not outgoing calls.  The bucket
is a Lua script so that taking a token is one atomic step for every process on every machine,
timed by the Redis server's clock.

A caller that finds the bucket empty *reserves* the next free token instead of retrying:
the script lets the token count go negative and answers how long until the reserved token
exists.  The caller defers its call until then (job_queue's deferred set) and does not take a
token again, so calls reach the upstream at exactly the bucket's rate, in reservation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

import redis_store
from settings import Settings

# KEYS[1] bucket.  ARGV: rate per second, burst, horizon seconds, dry run (1 = only look).
# Returns {granted (1/0), wait seconds as string, tokens after as string}.
_ACQUIRE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst, horizon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or burst
local last = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
if ARGV[4] == '1' then
  return {0, '0', tostring(tokens)}
end
local after = tokens - 1
local wait = 0
if after < 0 then wait = -after / rate end
if wait > horizon then
  return {0, tostring(wait), tostring(tokens)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(after), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - after) / rate * 1000) + 1000)
return {1, tostring(wait), tostring(after)}
"""


@dataclass(frozen=True)
class Reservation:
    """The outcome of asking for a token.

    `granted` with `wait` 0: call now.  `granted` with `wait` > 0: a token is reserved; call
    after `wait` seconds without asking again.  Not granted: the next token is further away
    than the horizon (`wait` says how far); nothing was reserved.
    """

    granted: bool
    wait: float
    tokens: float


class RateLimiter:
    """Token buckets per source, sized from each source's settings."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._script = client.register_script(_ACQUIRE)

    def _key(self, source: str) -> str:
        return redis_store.key(self.settings, "ratelimit", source)

    def _run(self, source: str, horizon: float, dry_run: bool) -> Reservation:
        limits = self.settings.sources[source]
        granted, wait, tokens = self._script(
            keys=[self._key(source)],
            args=[limits.rate_per_minute / 60.0, limits.burst, horizon, "1" if dry_run else "0"],
        )
        return Reservation(bool(int(granted)), float(wait), float(tokens))

    def reserve(self, source: str, horizon: float | None = None) -> Reservation:
        """Take or reserve one token of `source`; never reserves further ahead than `horizon`."""
        return self._run(source, self.settings.defer_horizon if horizon is None else horizon, False)

    def tokens(self, source: str) -> float:
        """Tokens available now (negative: that many calls are already reserved ahead)."""
        return self._run(source, 0, True).tokens

    def status_all(self) -> dict[str, dict]:
        """Per source: rate, burst and tokens now (for /api/status)."""
        return {
            name: {
                "rate_per_minute": limits.rate_per_minute,
                "burst": limits.burst,
                "tokens": round(self.tokens(name), 3),
            }
            for name, limits in self.settings.sources.items()
        }

    def reset(self, source: str) -> None:
        """Refill a bucket (admin and tests)."""
        self.redis.delete(self._key(source))
