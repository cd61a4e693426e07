"""Prometheus metrics: their definitions and the helpers the other modules call to record them.

Every process counts what it does itself.  gunicorn's web workers share one `/metrics` through
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by gunicorn_config.py for
gunicorn's processes only); each Celery worker serves its own on WORKER_METRICS_PORT, since
workers run on other machines in production.  The web `/metrics` (enrich/web/metrics_endpoint.py)
also reads the cluster-wide state kept in Redis at scrape time (cluster_metrics.py), so one scrape
shows the whole picture.

Labels are bounded: identifier types, source names, outcomes, task names; never an identifier
or a lookup id.  A helper never raises: a metric that cannot be recorded (the multiprocess
directory gone) is logged, at most once a minute, and the lookup goes on.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOOKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0)

LOOKUPS = Counter(
    "enrich_lookups", "Lookups by their first answer: cached, complete, failed, partial", ["type", "outcome"]
)
LOOKUP_DURATION = Histogram(
    "enrich_lookup_duration_seconds",
    "Seconds from a lookup's creation to its first answer (cached, complete, failed or partial)",
    ["type", "outcome"],
    buckets=LOOKUP_BUCKETS,
)
CACHE_READS = Counter(
    "enrich_cache_reads", "Cache entries read, by result: hit, miss, stale", ["type", "result"]
)
SOURCE_REQUESTS = Counter(
    "enrich_source_requests",
    "Source calls by outcome (breaker_open: no request was made)",
    ["source", "outcome"],
)
SOURCE_LATENCY = Histogram(
    "enrich_source_request_duration_seconds",
    "Seconds per upstream request that went out (any answer)",
    ["source"],
    buckets=LATENCY_BUCKETS,
)
BREAKER_TRANSITIONS = Counter(
    "enrich_breaker_transitions",
    "Breaker state changes made by this process",
    ["source", "from_state", "to_state"],
)
RATE_LIMIT_DELAYS = Counter(
    "enrich_rate_limit_delays",
    "Source calls put off by the rate limit: reserved (waits for its token), paced (its send "
    "slot too far away), exhausted (past the horizon, not made)",
    ["source", "reason"],
)
RATE_LIMIT_DELAY_SECONDS = Counter(
    "enrich_rate_limit_delay_seconds", "Seconds source calls were put off by the rate limit", ["source"]
)
TASK_DURATION = Histogram(
    "enrich_task_duration_seconds", "Seconds a Celery task ran", ["task"], buckets=LATENCY_BUCKETS
)
TASKS_IN_PROGRESS = Gauge(
    "enrich_tasks_in_progress", "Celery tasks running now", ["task"], multiprocess_mode="livesum"
)
TASKS = Counter("enrich_tasks", "Celery tasks finished, by final state", ["task", "state"])
EVENT_STREAMS = Gauge("enrich_event_streams_open", "Event streams open now", multiprocess_mode="livesum")
EVENTS_PUBLISHED = Counter("enrich_events_published", "Lookup events published, by event type", ["type"])
DEAD_LETTERS_ADDED = Counter(
    "enrich_dead_letters_added", "Source calls sent to the dead-letter list after every retry", ["source"]
)

EVENT_TYPES = frozenset({"snapshot", "source", "progress", "partial", "complete", "error"})
_warned_at: dict[str, float] = {}


def warn_rate_limited(what: str, error: BaseException, every: float = 60.0) -> None:
    """Log a failure of an observability path at most once per `every` seconds per `what`."""
    now = time.monotonic()
    if now - _warned_at.get(what, -every) >= every:
        _warned_at[what] = now
        log.warning("%s failed (skipped; logged at most once a minute): %s", what, error)


def _never_raises(function: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a metric must never break what it measures
            warn_rate_limited(f"metric {function.__name__}", error)

    return wrapper


@_never_raises
def lookup_finished(kind: str, outcome: str, created_at: float) -> None:
    """A lookup gave its first answer (`cached`, `answered` (a CPF), `complete`, `failed` or `partial`)."""
    LOOKUPS.labels(kind, outcome).inc()
    LOOKUP_DURATION.labels(kind, outcome).observe(max(0.0, time.time() - created_at))


@_never_raises
def cache_read(kind: str, hits: int, misses: int, stale: int) -> None:
    """Entries one cache read found fresh, missed, or found stale (the breaker fallback)."""
    for result, amount in (("hit", hits), ("miss", misses), ("stale", stale)):
        if amount:
            CACHE_READS.labels(kind, result).inc(amount)


def source_outcome(error: BaseException | None) -> str:
    """The outcome label of a source call that raised `error` (None: it answered)."""
    if error is None:
        return "ok"
    reason = getattr(error, "reason", None)  # SourceError's short machine word
    return reason if reason in ("not_found", "rejected", "rate_limited") else "error"


@_never_raises
def source_request(source: str, outcome: str, seconds: float | None = None) -> None:
    """A source call's outcome; `seconds` when a request went out (none for breaker_open)."""
    SOURCE_REQUESTS.labels(source, outcome).inc()
    if seconds is not None:
        SOURCE_LATENCY.labels(source).observe(seconds)


@_never_raises
def breaker_transition(source: str, before: str, after: str) -> None:
    """This process moved a breaker from `before` to `after` (closed, open, half-open)."""
    BREAKER_TRANSITIONS.labels(source, before, after).inc()


@_never_raises
def rate_limit_delay(source: str, reason: str, seconds: float) -> None:
    """A source call waits `seconds` for the rate limit (`reserved`, `paced`) or is not made (`exhausted`)."""
    RATE_LIMIT_DELAYS.labels(source, reason).inc()
    if reason != "exhausted":
        RATE_LIMIT_DELAY_SECONDS.labels(source).inc(max(0.0, seconds))


_running: dict[tuple[str, int], float] = {}
_running_lock = threading.Lock()


@_never_raises
def task_started(task: str, task_id: str) -> None:
    """Celery's task_prerun (same thread as its postrun, in the threads pool)."""
    with _running_lock:
        _running[(task_id, threading.get_ident())] = time.perf_counter()
    TASKS_IN_PROGRESS.labels(task).inc()


@_never_raises
def task_finished(task: str, task_id: str, state: str | None) -> None:
    """Celery's task_postrun: duration, final state, one fewer in progress."""
    with _running_lock:
        started = _running.pop((task_id, threading.get_ident()), None)
    if started is None:
        return
    TASKS_IN_PROGRESS.labels(task).dec()
    TASK_DURATION.labels(task).observe(time.perf_counter() - started)
    TASKS.labels(task, state or "UNKNOWN").inc()


@_never_raises
def stream_opened() -> None:
    EVENT_STREAMS.inc()


@_never_raises
def stream_closed() -> None:
    EVENT_STREAMS.dec()


@_never_raises
def events_published(types: list[str]) -> None:
    """Events appended to a lookup's log and announced (unknown types count as `other`)."""
    for event_type in types:
        EVENTS_PUBLISHED.labels(event_type if event_type in EVENT_TYPES else "other").inc()


@_never_raises
def dead_letter_added(source: str) -> None:
    DEAD_LETTERS_ADDED.labels(source).inc()


# -- serving ---------------------------------------------------------------------------------


def serve_worker_metrics(host: str, port: int, hostname: str = "") -> bool:
    """A Celery worker's own /metrics on host:port (0: off); a port already taken is a warning, not a crash."""
    if port == 0:
        log.info("worker metrics are off (WORKER_METRICS_PORT=0)")
        return False
    if os.environ.get(MULTIPROC_ENV):
        # Only gunicorn's processes share a directory; a worker's counters would land in files
        # the web app's gunicorn wipes at its start, and workers on other machines never see it.
        log.warning(
            "%s is set in a Celery worker: unset it; only the web app's gunicorn uses it", MULTIPROC_ENV
        )
    try:
        start_http_server(port, addr=host)
    except OSError as error:
        log.warning(
            "worker %s serves no metrics: cannot listen on %s:%d (%s); give each worker on a machine "
            "its own WORKER_METRICS_PORT, or 0 for none",
            hostname,
            host,
            port,
            error,
        )
        return False
    log.info("worker %s serves metrics on http://%s:%d/metrics", hostname, host, port)
    return True
