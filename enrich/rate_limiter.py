"""Cluster-wide token buckets, one per source, shared by every worker process through Redis.

Hand-written because no library does this well here: Celery's `rate_limit` is per worker
(celery/celery#5927) and flask-limiter limits incoming requests, not outgoing calls.  The bucket
is a Lua script so that taking a token is one atomic step for every process on every machine,
timed by the Redis server's clock.

A caller that finds the bucket empty *reserves* the next free token instead of retrying:
the script lets the token count go negative and answers how long until the reserved token
exists.  The caller defers its call until then (job_queue's deferred set) and does not take a
token again, so calls are *scheduled* at exactly the bucket's rate, in reservation order.

A schedule alone does not protect the upstream: a deferred call reaches a worker late when the
broker queue is long, and calls that run late by different amounts bunch up (measured: 122 calls
in one second against a limit of 20).  So every call, right before it goes out, also checks a
log of starts per source (`admit`): it goes ahead only while the last second holds fewer than
rate + burst starts and the last minute fewer than the per-minute rate + burst; otherwise it
waits a little longer, keeping its token.

Bulk batches (enrich/batches/) share the buckets under one more rule: a batch item's call takes a token
only while more than BATCH_TOKEN_RESERVE tokens would remain, and never reserves ahead.  The bucket
holds burst + reserve tokens (and room for a dispatcher round's refill: `capacity`), so an
interactive lookup arriving during a batch finds the reserve at once; the log of starts keeps the
upstream's view as it was (its caps do not grow with it).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import redis

from enrich import redis_store
from enrich.feature_flags import FeatureFlags
from enrich.settings import Settings

# KEYS[2] the start log: a sorted set of call starts scored by Redis time.  A call may start
# while it holds fewer than ARGV[6] starts in the last second and fewer than ARGV[7] in the last
# minute (ARGV[8]: a unique member name; ARGV[1..5] are the bucket's, unused here).  Returns 0
# and logs the start, or the seconds to wait.
_ADMIT = """
local function start_wait(log_key, now, per_second, per_minute)
  redis.call('ZREMRANGEBYSCORE', log_key, '-inf', now - 60)
  local in_minute = redis.call('ZCARD', log_key)
  local in_second = redis.call('ZCOUNT', log_key, now - 1, '+inf')
  local wait = 0
  if in_second >= per_second then
    local oldest = redis.call('ZRANGEBYSCORE', log_key, now - 1, '+inf', 'WITHSCORES', 'LIMIT', in_second - per_second, 1)
    wait = tonumber(oldest[2]) + 1 - now
  end
  if in_minute >= per_minute then
    local oldest = redis.call('ZRANGE', log_key, in_minute - per_minute, in_minute - per_minute, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + 60 - now)
  end
  if wait > 0 then return math.max(wait, 0.001) end
  return 0
end
local function log_start(log_key, now)
  redis.call('ZADD', log_key, now, ARGV[8])
  redis.call('EXPIRE', log_key, 61)
end
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local wait = start_wait(KEYS[2], now, tonumber(ARGV[6]), tonumber(ARGV[7]))
if wait == 0 then log_start(KEYS[2], now) end
return tostring(wait)
"""

# KEYS[1] bucket.  ARGV: rate per second, capacity, horizon seconds, dry run (1 = only look), keep
# (empty: may reserve ahead; a number: take a token only while more than that many remain, never
# reserve ahead).  Returns {granted (1/0), wait seconds as string, tokens after as string, held (1/0)}:
# a held call was refused by `keep` and may ask again after `wait`.
_ACQUIRE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst, horizon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or burst
local last = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
if ARGV[4] == '1' then
  return {0, '0', tostring(tokens), 0}
end
if ARGV[5] ~= '' and tokens - 1 < tonumber(ARGV[5]) then
  return {0, tostring((tonumber(ARGV[5]) + 1 - tokens) / rate), tostring(tokens), 1}
end
local after = tokens - 1
local wait = 0
if after < 0 then wait = -after / rate end
if wait > horizon then
  return {0, tostring(wait), tostring(tokens), 0}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(after), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - after) / rate * 1000) + 1000)
return {1, tostring(wait), tostring(after), 0}
"""


@dataclass(frozen=True)
class Reservation:
    """The outcome of asking for a token.

    `granted` with `wait` 0: call now.  `granted` with `wait` > 0: a token is reserved; call
    after `wait` seconds without asking again.  Not granted: the next token is further away
    than the horizon (`wait` says how far); nothing was reserved.  `held`: a batch call refused
    because taking a token would leave no more than the interactive reserve; nothing was taken.
    """

    granted: bool
    wait: float
    tokens: float
    held: bool = False  # refused to keep the interactive reserve: ask again after `wait`


class RateLimiter:
    """Token buckets per source, sized from each source's settings."""

    def __init__(self, client: redis.Redis, settings: Settings, flags: FeatureFlags | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.flags = flags
        self._script = client.register_script(_ACQUIRE)
        self._admit = client.register_script(_ADMIT)

    def _key(self, source: str) -> str:
        return redis_store.key(self.settings, "ratelimit", source)

    def capacity(self, source: str) -> int:
        """Tokens the bucket holds when full: the burst, the reserve kept for interactive lookups and,
        with a reserve, room for one dispatcher round's refill above it.

        A held batch call asks again once a round (DEFERRED_POLL_INTERVAL); with no room above the
        reserve the bucket overflowed between rounds and batches got one token a round, half of
        BrasilAPI's rate (docs/benchmarks.md, benchmark 7).  Reserve 0: the burst alone.
        """
        limits = self.settings.sources[source]
        reserve = max(0, self.settings.batch_token_reserve)
        if not reserve:
            return limits.burst
        room = round(limits.rate_per_minute / 60.0 * self.settings.deferred_poll_interval)
        return limits.burst + reserve + room

    def _args(
        self, source: str, horizon: float, dry_run: bool, keep: float | None = None
    ) -> tuple[list[str], list]:
        limits = self.settings.sources[source]
        rate = limits.rate_per_minute / 60.0
        # The log of starts caps what the upstream sees whatever the bucket holds (its reserve
        # included): floor, so 2.85 a minute is never 4 starts in a minute against a quota of 3.
        per_second = math.ceil(rate) + limits.burst
        per_minute = math.floor(limits.rate_per_minute) + limits.burst
        keys = [self._key(source), redis_store.key(self.settings, "ratelimit", source, "starts")]
        unique = secrets.token_hex(8)
        dry = "1" if dry_run else "0"
        kept = "" if keep is None else keep
        return keys, [rate, self.capacity(source), horizon, dry, kept, per_second, per_minute, unique]

    def _run(self, source: str, horizon: float, dry_run: bool, keep: float | None = None) -> Reservation:
        keys, args = self._args(source, horizon, dry_run, keep)
        granted, wait, tokens, held = self._script(keys=keys, args=args)
        return Reservation(bool(int(granted)), float(wait), float(tokens), bool(int(held)))

    @property
    def enabled(self) -> bool:
        """The `rate_limiting` feature flag: while off, every call goes at once and takes no token."""
        return self.flags is None or self.flags.enabled("rate_limiting")

    def admit(self, source: str, batch: bool = False) -> float:
        """A call about to go out: 0 (its start is logged, go) or the seconds it should wait first.

        `batch`: the reserve holds in the log of starts too, a batch call starting only while
        BATCH_TOKEN_RESERVE more starts would still fit in the second and the minute; else a batch
        using a source's whole rate fills each second and a person's call waits for the next one.
        """
        if not self.enabled:
            return 0.0
        keys, args = self._args(source, 0, False)
        if batch:
            reserve = max(0, self.settings.batch_token_reserve)
            args[5], args[6] = max(1, args[5] - reserve), max(1, args[6] - reserve)
        return float(self._admit(keys=keys, args=args))

    def reserve(self, source: str, horizon: float | None = None, batch: bool = False) -> Reservation:
        """Take or reserve one token of `source`; never reserves further ahead than `horizon`.

        `batch`: a bulk batch's call takes a token only while more than BATCH_TOKEN_RESERVE remain
        and never reserves ahead (`held` with the wait until one would be free), so interactive
        lookups always find the reserve.
        """
        if not self.enabled:
            return Reservation(True, 0.0, float(self.capacity(source)))
        horizon = self.settings.defer_horizon if horizon is None else horizon
        return self._run(source, horizon, False, max(0, self.settings.batch_token_reserve) if batch else None)

    def tokens(self, source: str) -> float:
        """Tokens available now (negative: that many calls are already reserved ahead)."""
        return self._run(source, 0, True).tokens

    def status_all(self) -> dict[str, dict]:
        """Per source: rate, burst and tokens now (for /api/status)."""
        return {
            name: {
                "rate_per_minute": limits.rate_per_minute,
                "burst": limits.burst,
                "batch_reserve": max(0, self.settings.batch_token_reserve),
                "tokens": round(self.tokens(name), 3),
            }
            for name, limits in self.settings.sources.items()
        }

    def reset(self, source: str) -> None:
        """Refill a bucket (admin and tests)."""
        keys, _ = self._args(source, 0, False)
        self.redis.delete(*keys)
