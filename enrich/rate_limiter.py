"""Cluster-wide token buckets, one per source, shared by every worker process through Redis, and the
pacing of each source's sends.

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
in one second against a limit of 20).  So every call, once its request is built, takes a *send
slot* from a log of send slots per source (`await_send`, one Lua script, one round trip): the
earliest time, on Redis's clock, on an even pace of one slot per `gap` (a little less than 1 /
(rate + burst) of a second; after a lull the burst may go at once, as GCRA allows), such that no
window of a second (and of a minute) widened by `widen` holds more than rate + burst slots (the
per-minute rate + burst).  The call sleeps until its slot in its own thread (when it is within
SEND_WAIT_MAX; further away it is deferred, keeping its token), and its `SendPermit` is confirmed
by the connection right before the request's first byte is written (sources.base.GatedAdapter):
a call later than its slot by more than `tolerance` (a third of `widen`: a thread starved after
its sleep) gives the slot back and takes the next free one.  So each send reaches the wire within
`tolerance` of a slot, plus the few steps to the socket, which the rest of `widen` covers: however
late calls start, no second at the upstream holds more than rate + burst of them, no minute more
than the per-minute rate + burst, and they go out spaced, never in a bunch.  The widening is kept
small enough that the slots still carry the whole rate, which leaves them little room to catch up
after a gap: so a call waiting for a token is sent SEND_LEAD ahead of it (pipeline), to wait at
its send slot rather than reach it late.

Bulk batches (enrich/batches/) share the buckets under one more rule: a batch item's call takes a token
only while more than BATCH_TOKEN_RESERVE tokens would remain, and never reserves ahead.  The bucket
holds burst + reserve tokens (and room for a dispatcher round's refill: `capacity`), so an
interactive lookup arriving during a batch finds the reserve at once; the send slots keep the
upstream's view as it was (their caps do not grow with it), and a batch call takes a send slot only
while BATCH_TOKEN_RESERVE more would still fit in the second and the minute, and none more than half
a gap ahead, so a person's call queues behind no batch call.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass

import redis

from enrich import redis_store
from enrich.feature_flags import FeatureFlags
from enrich.settings import Settings

# KEYS[1] the log of send slots: a sorted set of each call's send slot, scored by Redis time (slots
# may lie ahead); KEYS[2] the pace: when the next slot is due at an even spacing (GCRA's theoretical
# arrival time).  ARGV: slots per widened second, per widened minute, the gap between slots, the
# pace's tolerance (burst x gap: that many slots may come early after a lull), the widening (s), the
# longest wait worth a slot (s), a unique member for this slot, the member of a slot this caller
# gives back ('' for none), and the earliest the slot may be (Redis time; 0 for none: a call sent
# ahead of its token's time takes no slot before that time).  Every slot is at least the latest one, so only windows ending at the new
# one can overflow: the slot is the earliest time on the pace whose widened second and minute hold
# room for it.  Returns {taken (1/0), seconds to the slot, the slot, Redis's time}, as strings to
# keep their microseconds; a slot further than the longest wait is not taken.
_SEND_SLOT = """
local function decimal(value) return string.format('%.6f', value) end
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local per_second, per_minute = tonumber(ARGV[1]), tonumber(ARGV[2])
local gap, early, widen, longest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local second, minute = 1 + widen, 60 + widen
if ARGV[8] ~= '' then redis.call('ZREM', KEYS[1], ARGV[8]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', decimal(now - minute))
local pace = tonumber(redis.call('GET', KEYS[2])) or now
local slot = math.max(now, pace - early, tonumber(ARGV[9]) or 0)
local count = redis.call('ZCARD', KEYS[1])
if count > 0 then
  slot = math.max(slot, tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]))
  for _, cap in ipairs({{per_second, second}, {per_minute, minute}}) do
    if count >= cap[1] then
      local oldest = redis.call('ZRANGE', KEYS[1], count - cap[1], count - cap[1], 'WITHSCORES')
      slot = math.max(slot, tonumber(oldest[2]) + cap[2])
    end
  end
end
if slot - now > longest then
  return {0, decimal(slot - now), decimal(slot), decimal(now)}
end
redis.call('ZADD', KEYS[1], decimal(slot), ARGV[7])
redis.call('PEXPIRE', KEYS[1], math.ceil((slot - now + minute) * 1000) + 1000)
pace = math.max(pace, slot) + gap
redis.call('SET', KEYS[2], decimal(pace), 'PX', math.ceil((pace - now) * 1000) + 1000)
return {1, decimal(slot - now), decimal(slot), decimal(now)}
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


# A send slot further away than this is not taken: the call is deferred (keeping its token) rather
# than hold a worker's thread asleep.
SEND_WAIT_MAX = 1.0
# A call that misses its slot this many times (its thread starved each time) is deferred.
SEND_ASKS_MAX = 4
# How far ahead of its time a call that waits for its token is sent (pipeline): it reaches a worker
# late by a varying amount (the dispatcher's poll, the broker), and a call that turns up after its
# slot leaves the upstream a gap it cannot make up (the windows do not let it catch up); sent ahead,
# it waits at its send slot instead, which holds it to its time.  Within SEND_WAIT_MAX.
SEND_LEAD = 0.5
# Bounds of the widening of the windows (seconds): the lateness a send may have past its slot.
WIDEN_MIN, WIDEN_MAX = 0.02, 0.5
# How much faster the even pace of slots runs than rate + burst a second (see `pacing`).
PACE_HEADROOM = 1.2
# Sends of a source limited to more calls a second than this are not paced (the bucket alone limits
# them): no worker comes near such a rate, and its windows would need a widening of a thread's
# lateness, tens of ms, which at a gap of microseconds every call would miss (the benchmarks'
# "unlimited" sources, at 100,000 a second).
PACE_MAX_RATE = 1000.0


@dataclass(frozen=True)
class Pacing:
    """How one source's sends are spaced (seconds): see the module's docstring."""

    per_second: int  # slots in any second widened by `widen`
    per_minute: int  # ... and in any minute widened by `widen`
    gap: float  # between consecutive slots
    early: float  # how early a slot may come after a lull (burst x gap): the burst, at once
    widen: float  # of both windows: the lateness a send may have past its slot and still count there
    tolerance: float  # lateness past its slot checked right before a send; `widen` - this covers the rest
    longest: float  # the longest wait for a slot a call sleeps through


@dataclass(frozen=True)
class SendSlot:
    """A send slot asked for: `taken` (at `at`, Redis's clock, `wait` after Redis's `now`) or not
    (the next one is `wait` away, further than the call may sleep)."""

    taken: bool
    wait: float
    at: float
    now: float
    member: str


class RedisClock:
    """The Redis server's clock as this process sees it, from the TIME each send slot's script read.

    Each answer bounds the offset (Redis's time minus ours): the script ran between our send and
    our receipt.  The bounds of all answers are intersected (widened by how far two clocks may drift
    apart since), so they narrow to the fastest round trip's; a contradiction (a clock was stepped)
    starts over from the newest answer.
    """

    DRIFT = 0.0005  # seconds per second two clocks may drift apart (NTP's largest slew)

    def __init__(self) -> None:
        self.low, self.high, self.seen = -math.inf, math.inf, 0.0
        self._lock = threading.Lock()

    def observe(self, redis_now: float, sent: float, received: float) -> None:
        low, high = redis_now - received, redis_now - sent
        with self._lock:
            drift = self.DRIFT * max(0.0, received - self.seen)
            merged = (max(low, self.low - drift), min(high, self.high + drift))
            self.low, self.high = merged if merged[0] <= merged[1] else (low, high)
            self.seen = received

    def remote(self, local_time: float) -> float:
        """The latest Redis time `local_time` (time.time()) may be (itself before any answer)."""
        return local_time + (self.high if math.isfinite(self.high) else 0.0)

    def local(self, redis_time: float) -> float:
        """The earliest local time (time.time()) sure to be no earlier than `redis_time` on Redis."""
        return redis_time - self.low

    def late(self, redis_time: float) -> float:
        """How far past `redis_time` Redis's clock may be now, at most."""
        return time.time() + self.high - redis_time


class RateLimiter:
    """Token buckets per source, sized from each source's settings."""

    def __init__(self, client: redis.Redis, settings: Settings, flags: FeatureFlags | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.flags = flags
        self._script = client.register_script(_ACQUIRE)
        self._send_slot = client.register_script(_SEND_SLOT)
        self.clock = RedisClock()
        self.sleep = time.sleep  # until a send slot (tests make a thread oversleep with it)

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

    def _key(self, source: str) -> str:
        return redis_store.key(self.settings, "ratelimit", source)

    def _slots_key(self, source: str) -> str:
        return redis_store.key(self.settings, "ratelimit", source, "starts")

    def _run(self, source: str, horizon: float, dry_run: bool, keep: float | None = None) -> Reservation:
        limits = self.settings.sources[source]
        args = [limits.rate_per_minute / 60.0, self.capacity(source), horizon, "1" if dry_run else "0"]
        kept = "" if keep is None else keep
        granted, wait, tokens, held = self._script(keys=[self._key(source)], args=[*args, kept])
        return Reservation(bool(int(granted)), float(wait), float(tokens), bool(int(held)))

    def pacing(self, source: str, batch: bool = False) -> Pacing:
        """How `source`'s sends are spaced; `batch`: a batch call's, which leaves the reserve."""
        limits = self.settings.sources[source]
        rate = limits.rate_per_minute / 60.0
        # What the upstream may see whatever the bucket holds (its reserve included): floor, so 2.85
        # a minute is never 4 calls in a minute against a quota of 3.
        per_second = math.ceil(rate) + limits.burst
        per_minute = math.floor(limits.rate_per_minute) + limits.burst
        # The pace runs PACE_HEADROOM faster than the windows allow, so that they, not the pace, hold
        # sends to the rate: a slot missed by a starved thread leaves a hole in the pace, and the
        # headroom lets the calls after it make up for it.
        gap = 1.0 / (PACE_HEADROOM * max(1, per_second))
        # The widened windows must still carry the rate: per_second / (1 + widen) >= rate and
        # per_minute / (60 + widen) >= rate (at 20/s with burst 1, up to 50 ms).  Never less than
        # WIDEN_MIN, which a thread's wake-up and the clock's bounds need: with no burst, or at a
        # rate so high its gap is microseconds, that costs the share of the rate it takes.
        room = min(per_second / rate - 1.0, per_minute / rate - 60.0) if rate > 0 else WIDEN_MAX
        widen = min(WIDEN_MAX, max(WIDEN_MIN, 0.9 * room))
        longest = SEND_WAIT_MAX
        if batch:
            reserve = max(0, self.settings.batch_token_reserve)
            per_second, per_minute = max(1, per_second - reserve), max(1, per_minute - reserve)
            longest = gap / 2  # never queued ahead: a person's call would queue behind it
        # A third of the widening for a thread's lateness at its last look at the clock, two thirds
        # for the steps from there to the socket (a thread preempted among them: tens of ms on a
        # busy machine); a slot missed costs one round trip, and the pace's headroom makes it up.
        return Pacing(per_second, per_minute, gap, limits.burst * gap, widen, widen / 3, longest)

    def send_slot(
        self, source: str, batch: bool = False, give_back: str = "", not_before: float = 0.0
    ) -> SendSlot:
        """Take `source`'s next send slot if it is within the call's longest wait (one round trip),
        giving back the slot named `give_back` first (a slot missed); none earlier than `not_before`
        (time.time(): when the call's token is due)."""
        pacing = self.pacing(source, batch)
        member = secrets.token_hex(8)
        args = [pacing.per_second, pacing.per_minute, pacing.gap, pacing.early, pacing.widen, pacing.longest]
        keys = [self._slots_key(source), redis_store.key(self.settings, "ratelimit", source, "pace")]
        earliest = self.clock.remote(not_before) if not_before > 0 else 0
        sent = time.time()
        taken, wait, at, now = self._send_slot(keys=keys, args=[*args, member, give_back, earliest])
        self.clock.observe(float(now), sent, time.time())
        return SendSlot(bool(int(taken)), float(wait), float(at), float(now), member)

    def await_send(
        self, source: str, batch: bool = False, not_before: float = 0.0
    ) -> tuple[float, SendPermit | None]:
        """A call whose request is built: takes its send slot (one round trip) and sleeps until it.

        Returns (0, a permit to `confirm` right before the request's first byte is written), or (the
        seconds it should be deferred first, keeping its token; None) when its slot is further away
        than it may sleep.  (0, None) while rate limiting is off, and for a source above
        PACE_MAX_RATE.  `batch`: the reserve holds in the send slots too, a batch call taking one
        only while BATCH_TOKEN_RESERVE more would still fit in the second and the minute, and only
        within half a gap of now; else a batch using a source's whole rate would fill each second
        and queue ahead of a person's call.  `not_before` (time.time()): when the call's token is
        due; a call sent ahead of it (SEND_LEAD) sleeps until a slot no earlier, so the slots never
        run ahead of the bucket.
        """
        if not self.paces(source):
            return 0.0, None
        slot = self.send_slot(source, batch, not_before=not_before)
        if not slot.taken:
            return slot.wait, None
        self.sleep_until(slot.at)
        return 0.0, SendPermit(self, source, batch, slot)

    def sleep_until(self, redis_time: float) -> None:
        """Sleep until `redis_time` on Redis's clock has surely come."""
        while (asleep := self.clock.local(redis_time) - time.time()) > 0:
            self.sleep(asleep)

    def paces(self, source: str) -> bool:
        """Whether `source`'s sends take send slots: while rate limiting is on, up to PACE_MAX_RATE."""
        return self.enabled and self.settings.sources[source].rate_per_minute / 60.0 <= PACE_MAX_RATE

    def send_lead(self, source: str) -> float:
        """How far ahead of its token's time a call of `source` that waits for it is sent (SEND_LEAD);
        none when its sends take no slot, as nothing would hold it to its time then."""
        return SEND_LEAD if self.paces(source) else 0.0

    @property
    def enabled(self) -> bool:
        """The `rate_limiting` feature flag: while off, every call goes at once and takes no token."""
        return self.flags is None or self.flags.enabled("rate_limiting")

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

    def give_back(self, source: str, member: str) -> None:
        """Free a send slot its call will not use (the next slot asked for may give one back too)."""
        self.redis.zrem(self._slots_key(source), member)

    def reset(self, source: str) -> None:
        """Refill a bucket and forget its send slots (admin and tests)."""
        pace = redis_store.key(self.settings, "ratelimit", source, "pace")
        self.redis.delete(self._key(source), self._slots_key(source), pace)


class SendPermit:
    """A send slot taken and slept until: `confirm` it right before the request's first byte goes out."""

    def __init__(self, limiter: RateLimiter, source: str, batch: bool, slot: SendSlot) -> None:
        self.limiter, self.source, self.batch, self.slot = limiter, source, batch, slot
        self.pacing = limiter.pacing(source, batch)
        self.missed = 0  # slots this call's thread ran too late for

    def confirm(self) -> float:
        """0: send now, at most `tolerance` past the slot.  A thread that ran later (starved after
        its sleep, or on its way to the socket) gives the slot back and takes the next free one,
        sleeping again; the seconds to defer the call by when that is further than it may sleep, or
        when it missed SEND_ASKS_MAX slots."""
        limiter = self.limiter
        while limiter.clock.late(self.slot.at) > self.pacing.tolerance:
            self.missed += 1
            if self.missed >= SEND_ASKS_MAX:
                limiter.give_back(self.source, self.slot.member)
                return self.pacing.gap
            slot = limiter.send_slot(self.source, self.batch, give_back=self.slot.member)
            if not slot.taken:  # the missed one was given back all the same
                return slot.wait
            self.slot = slot
            limiter.sleep_until(slot.at)
        return 0.0
