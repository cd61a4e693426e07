"""The status page's recent history: cluster-wide counters and gauges in 10 s Redis buckets, and their series.

Each bucket is one hash, `{prefix}:history:<bucket start>`, expiring an hour after it ends, so every
web process and every worker on any machine adds to the same buckets.  Two kinds of field:

- counters, added where things happen (`add_counts`, usually riding along with a round trip the
  caller makes anyway; `Tally` on a path that has none, written about once a second per process):
  lookups answered from the cache or started, lookups finished with a latency
  histogram in fixed bins (a p95 per bucket is computed from its counts), rate-limit waits;
- gauges, sampled once per bucket (maintenance.sample_status_history: every worker's dispatcher
  every 5 s, and every history read): queue depth, each breaker's state, the cache's cumulative hit/miss totals
  (a bucket's hit rate is the change of those totals since the sample before).  HSETNX: the first
  sampler of a bucket wins, so several samplers never fight.  A read shows the current bucket's
  gauges as they are at that moment.

Counters are best effort: a Redis failure on their own round trip is logged (at most once a
minute per process) and skipped; it never fails a lookup.  A history read needs Redis (503).
This module stores and reads; what the gauges are is maintenance's, the route enrich/web/history's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from enrich import redis_store
from enrich.settings import Settings

log = logging.getLogger("status_history")

BUCKET_SECONDS = 10
# Buckets live an hour past their end plus a margin: the longest window the API serves is 60 min.
BUCKET_TTL_SECONDS = 3600 + 5 * 60
DEFAULT_MINUTES, MAX_MINUTES = 15, 60
# Upper bounds (ms) of the latency bins; a last, unbounded bin takes the rest.
LATENCY_BOUNDS_MS = (
    25,
    50,
    100,
    150,
    250,
    400,
    600,
    1000,
    1500,
    2500,
    4000,
    6000,
    10_000,
    15_000,
    30_000,
    60_000,
)
OVERFLOW_BIN = "latency:inf"
SAMPLED_AT = "sampled_at"
WARNING_INTERVAL = 60.0

_last_warning = [float("-inf")]


def bucket_start(now: float) -> int:
    """The start (epoch seconds) of the bucket `now` falls in."""
    return int(now // BUCKET_SECONDS) * BUCKET_SECONDS


def bucket_key(settings: Settings, start: int) -> str:
    return redis_store.key(settings, "history", start)


def latency_field(milliseconds: float) -> str:
    """The histogram field a latency is counted in: the smallest bound it does not exceed."""
    for bound in LATENCY_BOUNDS_MS:
        if milliseconds <= bound:
            return f"latency:{bound}"
    return OVERFLOW_BIN


def warn_skipped(what: str, error: Exception) -> None:
    """Log a skipped write, at most once a minute per process (an outage would otherwise flood the log)."""
    now = time.monotonic()
    if now - _last_warning[0] >= WARNING_INTERVAL:
        _last_warning[0] = now
        log.warning(
            "%s skipped, Redis unreachable: %s (more are not logged for %.0f s)",
            what,
            error,
            WARNING_INTERVAL,
        )


def add_counts(
    target: redis.Redis | redis.client.Pipeline,
    settings: Settings,
    counts: Mapping[str, int],
    now: float | None = None,
) -> None:
    """HINCRBY `counts` into the current bucket and refresh its expiry, on `target`.

    With a caller's pipeline the counters ride along with its round trip (they share its fate:
    they cannot fail on their own, only with the whole round trip).
    """
    key = bucket_key(settings, bucket_start(now if now is not None else time.time()))
    for field, amount in counts.items():
        target.hincrby(key, field, amount)
    target.expire(key, BUCKET_TTL_SECONDS)


def count(
    client: redis.Redis, settings: Settings, counts: Mapping[str, int], now: float | None = None
) -> bool:
    """`add_counts` on a round trip of its own; a Redis failure is logged and skipped (False)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            add_counts(pipe, settings, counts, now)
            pipe.execute()
        return True
    except redis.RedisError as error:
        warn_skipped("status history counter", error)
        return False


class Tally:
    """Counters a process adds up in memory and writes about once a FLUSH_INTERVAL, for a path that
    makes no round trip of its own (a lookup answered from the cache).

    Each count is kept under the bucket it happened in, so a flush late by a second still adds
    it to the right bucket.  The flush runs on a timer thread (a greenlet under gevent) started by
    the first count after a flush, never on the request that counts; a failed flush is logged
    (`warn_skipped`) and its counts dropped, best effort as every counter here.  What a process
    still held when it exited (at most a second's worth) is lost.
    """

    FLUSH_INTERVAL = 1.0

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._pending: dict[int, dict[str, int]] = {}  # bucket start -> field -> amount
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def add(self, counts: Mapping[str, int], now: float | None = None) -> None:
        bucket = bucket_start(now if now is not None else time.time())
        with self._lock:
            fields = self._pending.setdefault(bucket, {})
            for field, amount in counts.items():
                fields[field] = fields.get(field, 0) + amount
            if self._timer is None:
                self._timer = threading.Timer(self.FLUSH_INTERVAL, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> bool:
        """Write what is pending now (also called by the timer); False if Redis refused it."""
        with self._lock:
            pending, self._pending, self._timer = self._pending, {}, None
        if not pending:
            return True
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for bucket, counts in pending.items():
                    key = bucket_key(self.settings, bucket)
                    for field, amount in counts.items():
                        pipe.hincrby(key, field, amount)
                    pipe.expire(key, BUCKET_TTL_SECONDS)
                pipe.execute()
            return True
        except redis.RedisError as error:
            warn_skipped("status history counter", error)
            return False


# -- gauges --------------------------------------------------------------------------------


def _write_sample(pipe: redis.client.Pipeline, key: str, gauges: Mapping[str, Any], now: float) -> None:
    for field, value in {SAMPLED_AT: now, **gauges}.items():
        pipe.hsetnx(key, field, value)
    pipe.expire(key, BUCKET_TTL_SECONDS)


def has_sample(client: redis.Redis, settings: Settings, now: float) -> bool:
    """Whether the bucket `now` falls in has its gauges sampled already."""
    return bool(client.hexists(bucket_key(settings, bucket_start(now)), SAMPLED_AT))


def write_sample(client: redis.Redis, settings: Settings, gauges: Mapping[str, Any], now: float) -> bool:
    """Write `gauges` into the bucket `now` falls in unless it has a sample (HSETNX: the first wins).

    True when this call wrote it.  Raises redis.RedisError when Redis is away.
    """
    with client.pipeline(transaction=False) as pipe:
        _write_sample(pipe, bucket_key(settings, bucket_start(now)), gauges, now)
        return bool(pipe.execute()[0])


# -- series --------------------------------------------------------------------------------


def quantile_from_bins(bins: Mapping[str, int], quantile: float = 0.95) -> float | None:
    """The quantile of a latency histogram (fields as `latency_field` names them), in ms.

    Interpolated linearly inside the bin it falls in, as Prometheus' histogram_quantile does; in
    the unbounded last bin it is that bin's lower bound.  None without any count.
    """
    total = sum(bins.values())
    if total <= 0:
        return None
    rank = quantile * total
    below, lower = 0, 0.0
    for bound in LATENCY_BOUNDS_MS:
        inside = bins.get(f"latency:{bound}", 0)
        if inside and below + inside >= rank:
            return round(lower + (bound - lower) * (rank - below) / inside, 1)
        below, lower = below + inside, float(bound)
    return float(LATENCY_BOUNDS_MS[-1])


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {field.decode(): value.decode() for field, value in raw.items()}


def _integer(bucket: Mapping[str, str], field: str) -> int:
    return int(bucket.get(field, 0))


def _hit_rates(buckets: list[dict[str, str]]) -> list[float | None]:
    """Per bucket (all but the first, which only serves as a baseline): hits / reads since the previous sample."""
    rates: list[float | None] = []
    previous: tuple[int, int] | None = None
    for bucket in buckets:
        totals = None
        if "cache_hits_total" in bucket:
            totals = (int(bucket["cache_hits_total"]), int(bucket["cache_misses_total"]))
        rate = None
        if totals is not None and previous is not None:
            hits, misses = totals[0] - previous[0], totals[1] - previous[1]
            # Negative: the totals were reset (a new key prefix, a flushed Redis) - no rate then.
            if hits >= 0 and misses >= 0 and hits + misses:
                rate = round(hits / (hits + misses), 4)
        rates.append(rate)
        previous = totals if totals is not None else previous
    return rates[1:]


def history(
    client: redis.Redis, settings: Settings, gauges: Mapping[str, Any], minutes: int, now: float
) -> dict[str, Any]:
    """The last `minutes` as one point per bucket, oldest first, the current (unfinished) one last.

    `gauges` are the cluster's as they are now: the last point shows them, and they are sampled
    into the current bucket if no one has yet.  Raises redis.RedisError when Redis is away.
    """
    current = bucket_start(now)
    count_in_window = minutes * 60 // BUCKET_SECONDS
    # One bucket more than the window, before it: the baseline of the first bucket's hit rate.
    starts = [current - BUCKET_SECONDS * back for back in range(count_in_window, -1, -1)]
    with client.pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(bucket_key(settings, start))
        buckets = [_decode(raw) for raw in pipe.execute()]
    if SAMPLED_AT not in buckets[-1]:
        with client.pipeline(transaction=False) as pipe:
            _write_sample(pipe, bucket_key(settings, current), gauges, now)
            pipe.execute()
    # The last point is the cluster as it is now (a breaker that opened a second ago shows open at
    # once); the stored sample, the bucket's first, is what the point becomes once the bucket is over.
    buckets[-1] = {**buckets[-1], **{field: str(value) for field, value in gauges.items()}}
    window = buckets[1:]
    spans = [BUCKET_SECONDS] * (len(window) - 1) + [max(1.0, now - current)]
    lookups = [_integer(b, "answered") + _integer(b, "started") for b in window]
    return {
        "time": now,
        "minutes": minutes,
        "bucket_seconds": BUCKET_SECONDS,
        "buckets": starts[1:],
        "lookups_per_second": [round(n / span, 3) for n, span in zip(lookups, spans, strict=True)],
        "lookups_answered": [_integer(b, "answered") for b in window],
        "lookups_started": [_integer(b, "started") for b in window],
        "lookups_finished": [
            _integer(b, "finished:complete") + _integer(b, "finished:partial") for b in window
        ],
        "p95_ms": [
            quantile_from_bins({f: int(v) for f, v in b.items() if f.startswith("latency:")}) for b in window
        ],
        "cache_hit_rate": _hit_rates(buckets),
        "queue_depth": [int(b["queue_depth"]) if "queue_depth" in b else None for b in window],
        "rate_limit_waits": [_integer(b, "rate_limit_waits") for b in window],
        "breakers": {name: [b.get(f"breaker:{name}") for b in window] for name in settings.sources},
    }
