"""Beat's periodic work (cleanup, health check) and the operational state it reports: live workers,
the stored reports, and the gauges the status history samples.

Every function takes the app's parts (`Services`) it works on; the tasks and routes pass them.
"""

from __future__ import annotations

import logging
import time

import orjson
import redis

from circuit_breaker_manager import BreakerUnavailable
from enrich import redis_broker, redis_store, status_history
from enrich.services import Services

log = logging.getLogger("maintenance")


def _key(parts: Services, *names: object) -> str:
    return redis_store.key(parts.settings, *names)


def record_worker_heartbeat(parts: Services, hostname: str) -> None:
    """A worker says it is alive (a sorted set of hostnames scored by last beat)."""
    try:
        parts.redis.zadd(_key(parts, "workers"), {hostname: time.time()})
    except redis.RedisError as error:
        log.warning("worker heartbeat failed: %s", error)


def live_workers(parts: Services) -> list[str]:
    """Workers whose heartbeat is younger than WORKER_HEARTBEAT_TTL."""
    cutoff = time.time() - parts.settings.worker_heartbeat_ttl
    return sorted(m.decode() for m in parts.redis.zrangebyscore(_key(parts, "workers"), cutoff, "+inf"))


def queue_depths(parts: Services) -> dict[str, int]:
    """Messages waiting on the broker per API priority (10 most urgent)."""
    return redis_broker.queue_depths(parts.redis, parts.settings.key_prefix)


def cleanup(parts: Services) -> dict:
    """Delete lookups past retention (with their event logs and task ids), old cache generations,
    single-flight locks of vanished lookups, dead-letter ids of expired entries, batches past
    their retention, stale workers."""
    settings = parts.settings
    started = time.time()
    result = {
        "lookups": parts.lookups.delete_older_than(
            started - settings.lookup_retention, parts.events.stream_key
        ),
        "cache_entries": parts.cache.delete_old_generations(),
        "locks": parts.lookups.delete_stale_inflight(),
        "dead_letters": parts.dead_letters.prune(),
        "batches": parts.batches.delete_older_than(
            started - settings.batch_retention, parts.events.stream_key
        ),
        "cpf_leftovers": _purge_cpf_leftovers(parts),
        "workers": int(
            parts.redis.zremrangebyscore(
                _key(parts, "workers"), "-inf", started - 10 * settings.worker_heartbeat_ttl
            )
        ),
    }
    report = {"ran_at": started, "duration_ms": round((time.time() - started) * 1000, 1), "removed": result}
    parts.redis.set(_key(parts, "cleanup"), orjson.dumps(report))
    log.info("cleanup removed %s", result)
    return report


def _purge_cpf_leftovers(parts: Services) -> int:
    """Delete the CPFs an earlier version cached or recorded (this one never does: cpf_answers.py).

    Once per deployment: it scans every lookup record, and after the first run there is nothing
    left to find (an upgraded process writes no CPF), so a marker key says it is done.
    """
    client = parts.redis
    if client.exists(_key(parts, "cpf-purged")):
        return 0
    removed = parts.cache.purge_type("cpf") + parts.lookups.purge_type("cpf", parts.events.stream_key)
    client.set(_key(parts, "cpf-purged"), int(time.time()))
    return removed


def health_check(parts: Services) -> dict:
    """Redis latency, live workers, breaker states and quota tokens; stored for /api/status."""
    client = parts.redis
    started = time.perf_counter()
    client.ping()
    redis_ms = round((time.perf_counter() - started) * 1000, 2)
    breakers = {name: status.to_dict() for name, status in parts.breakers.status_all().items()}
    quotas = parts.rate_limiter.status_all()
    workers = live_workers(parts)
    # A batch whose step chain broke (its worker lost) gets a new step (batches.runner.BatchRunner).
    batches_running = parts.batch_runner.kick_stalled()
    problems = [f"breaker {name} is {b['state']}" for name, b in breakers.items() if b["state"] != "closed"]
    if not workers:
        problems.append("no live worker")
    report = {
        "checked_at": time.time(),
        "healthy": not problems,
        "problems": problems,
        "redis": {"ok": True, "latency_ms": redis_ms},
        "workers": workers,
        "breakers": breakers,
        "quotas": quotas,
        "batches_running": batches_running,
    }
    client.set(_key(parts, "health"), orjson.dumps(report))
    log.info("health check: %s", "healthy" if not problems else "; ".join(problems))
    return report


def last_report(parts: Services, name: str) -> dict | None:
    """The last stored `health` or `cleanup` report."""
    raw = parts.redis.get(_key(parts, name))
    return orjson.loads(raw) if raw else None


# -- the status history's gauges ---------------------------------------------------------------


def status_gauges(parts: Services) -> dict[str, object]:
    """Queue depth, breaker states and cache totals as the cluster sees them now."""
    broker = sum(queue_depths(parts).values())
    deferred = parts.deferred.pending()
    totals = parts.cache.counts()
    gauges: dict[str, object] = {
        "queue_depth": broker + deferred,
        "cache_hits_total": totals.get("hits", 0),
        "cache_misses_total": totals.get("misses", 0),
    }
    for name, status in parts.breakers.status_all().items():
        gauges[f"breaker:{name}"] = status.state
    return gauges


def sample_status_history(parts: Services, now: float | None = None) -> bool:
    """Sample the gauges into the status history's current bucket unless it has one already (every
    worker's dispatcher calls this every 5 s, and every history read does).

    Returns True when this call wrote one; a Redis failure is logged and skipped (False).
    """
    now = now if now is not None else time.time()
    try:
        if status_history.has_sample(parts.redis, parts.settings, now):
            return False
        return status_history.write_sample(parts.redis, parts.settings, status_gauges(parts), now)
    except (redis.RedisError, BreakerUnavailable) as error:  # breakers wrap Redis errors
        status_history.warn_skipped("status history sample", error)
        return False


def status_history_series(parts: Services, minutes: int, now: float | None = None) -> dict[str, object]:
    """The status history's last `minutes`, its last point the cluster's gauges as they are now.

    Raises redis.RedisError when Redis is away.
    """
    now = now if now is not None else time.time()
    parts.lookups.answered_counts.flush()  # this process's own counts first, as the cache's stats do
    return status_history.history(parts.redis, parts.settings, status_gauges(parts), minutes, now)
