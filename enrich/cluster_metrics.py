"""The cluster-wide state kept in Redis as Prometheus metrics, read at scrape time by the web `/metrics`.

Breakers, rate-limit buckets, broker queues, deferred calls, dead letters, live workers and the
cache's shared counters belong to no one process, so no process counts them: they are read
through the same readers as /api/status.  Every web process reports the same values (take
`max` across instances in queries).  With Redis unreachable the scrape still answers, with
`enrich_redis_up 0` and the processes' own metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from enrich import maintenance
from enrich.metrics import warn_rate_limited
from enrich.services import Services

BREAKER_STATES = ("closed", "open", "half-open")


def _breakers(parts: Services) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "enrich_breaker_state",
        "1 for each source breaker's current state, 0 for the others",
        labels=["source", "state"],
    )
    failures = GaugeMetricFamily(
        "enrich_breaker_failures", "Consecutive failures counted by a closed breaker", labels=["source"]
    )
    for name, status in parts.breakers.status_all().items():
        for candidate in BREAKER_STATES:
            state.add_metric([name, candidate], 1.0 if status.state == candidate else 0.0)
        failures.add_metric([name], status.failures)
    yield from (state, failures)


def _rate_limits(parts: Services) -> Iterator[Metric]:
    tokens = GaugeMetricFamily(
        "enrich_rate_limit_tokens",
        "Tokens in a source's cluster-wide bucket (negative: calls already reserved ahead)",
        labels=["source"],
    )
    rate = GaugeMetricFamily(
        "enrich_rate_limit_per_minute", "A source's cluster-wide call rate", labels=["source"]
    )
    for name, bucket in parts.rate_limiter.status_all().items():
        tokens.add_metric([name], bucket["tokens"])
        rate.add_metric([name], bucket["rate_per_minute"])
    yield from (tokens, rate)


def _queues(parts: Services) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "enrich_queue_depth",
        "Tasks waiting on the broker per API priority (10 most urgent)",
        labels=["priority"],
    )
    for priority, length in maintenance.queue_depths(parts).items():
        depth.add_metric([priority], length)
    yield depth
    yield GaugeMetricFamily(
        "enrich_deferred_calls",
        "Calls waiting in the deferred set (rate-limit slots, retry backoffs, lookup deadlines)",
        value=parts.deferred.pending(),
    )


def _dead_letters(parts: Services) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "enrich_dead_letters", "Entries on the dead-letter list", value=parts.dead_letters.count()
    )


def _workers(parts: Services) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "enrich_workers_live",
        "Workers with a fresh heartbeat",
        value=len(maintenance.live_workers(parts)),
    )


def _cache(parts: Services) -> Iterator[Metric]:
    cache = parts.cache
    reads = CounterMetricFamily(
        "enrich_cache_cluster_reads",
        "Cache entries read by every process since the counters began, by result",
        labels=["result"],
    )
    counts = cache.counts()
    for result, field in (("hit", "hits"), ("miss", "misses"), ("stale", "stale")):
        reads.add_metric([result], counts.get(field, 0))
    yield reads
    yield GaugeMetricFamily(
        "enrich_cache_generation",
        "The cache's generation (bumped by a full invalidation)",
        value=cache.generation(),
    )
    memory = parts.redis.info("memory").get("used_memory")
    if memory is not None:
        yield GaugeMetricFamily("enrich_redis_used_memory_bytes", "Memory Redis reports in use", value=memory)


def _batches(parts: Services) -> Iterator[Metric]:
    stats = parts.batches.cluster_stats()
    yield GaugeMetricFamily("enrich_batches_running", "Bulk batches not finished", value=stats["running"])
    yield GaugeMetricFamily(
        "enrich_batch_items_pending", "Items of running batches not started yet", value=stats["items_pending"]
    )
    yield GaugeMetricFamily(
        "enrich_batch_items_in_flight",
        "Batch items whose lookups run now, all batches together (at most BATCH_CONCURRENCY)",
        value=stats["items_in_flight"],
    )


READERS: tuple[tuple[str, Callable[[Services], Iterator[Metric]]], ...] = (
    ("breakers", _breakers),
    ("rate limits", _rate_limits),
    ("queues", _queues),
    ("dead letters", _dead_letters),
    ("workers", _workers),
    ("cache", _cache),
    ("batches", _batches),
)


class ClusterState:
    """A collector (`collect()` yields metric families) of the state shared through Redis."""

    def __init__(self, parts: Services) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        parts = self.parts
        up = GaugeMetricFamily("enrich_redis_up", "1 when this scrape reached Redis, 0 when it did not")
        try:
            parts.redis.ping()
        except redis.RedisError as error:
            # One failed ping is enough: each reader would wait out its own socket timeout.
            warn_rate_limited("metrics scrape: Redis", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, read in READERS:
            try:
                families = list(read(parts))  # whole, or not at all: no half-written family
            except Exception as error:  # noqa: BLE001 - a scrape answers whatever it can read
                warn_rate_limited(f"metrics scrape: {name}", error)
                continue
            yield from families
