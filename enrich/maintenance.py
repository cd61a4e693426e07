"""Beat's periodic work (cleanup, health check) and the operational state it reports."""

from __future__ import annotations

import logging
import time

import orjson
import redis
from flask import Flask

from enrich import redis_broker, redis_store
from enrich.extensions import services

log = logging.getLogger("maintenance")


def _key(*parts: object) -> str:
    return redis_store.key(services().settings, *parts)


def record_worker_heartbeat(app: Flask, hostname: str) -> None:
    """A worker says it is alive (a sorted set of hostnames scored by last beat)."""
    settings = services(app).settings
    try:
        services(app).redis.zadd(redis_store.key(settings, "workers"), {hostname: time.time()})
    except redis.RedisError as error:
        log.warning("worker heartbeat failed: %s", error)


def live_workers() -> list[str]:
    """Workers whose heartbeat is younger than WORKER_HEARTBEAT_TTL."""
    client = services().redis
    cutoff = time.time() - services().settings.worker_heartbeat_ttl
    return sorted(m.decode() for m in client.zrangebyscore(_key("workers"), cutoff, "+inf"))


def queue_depths() -> dict[str, int]:
    """Messages waiting on the broker per API priority (10 most urgent)."""
    settings = services().settings
    client = services().redis
    with client.pipeline(transaction=False) as pipe:
        for name in redis_broker.priority_lists(settings.key_prefix):
            pipe.llen(name)
        lengths = pipe.execute()
    return {str(10 - level): int(length) for level, length in enumerate(lengths)}


def cleanup() -> dict:
    """Delete lookups past retention (with their event logs and task ids), old cache generations,
    single-flight locks of vanished lookups, dead-letter ids of expired entries, batches past
    their retention, stale workers."""
    settings = services().settings
    started = time.time()
    result = {
        "lookups": services().lookups.delete_older_than(
            started - settings.lookup_retention, services().events.stream_key
        ),
        "cache_entries": services().cache.delete_old_generations(),
        "locks": services().lookups.delete_stale_inflight(),
        "dead_letters": services().dead_letters.prune(),
        "batches": services().batches.delete_older_than(started - settings.batch_retention),
        "cpf_leftovers": _purge_cpf_leftovers(),
        "workers": int(
            services().redis.zremrangebyscore(
                _key("workers"), "-inf", started - 10 * settings.worker_heartbeat_ttl
            )
        ),
    }
    report = {"ran_at": started, "duration_ms": round((time.time() - started) * 1000, 1), "removed": result}
    services().redis.set(_key("cleanup"), orjson.dumps(report))
    log.info("cleanup removed %s", result)
    return report


def _purge_cpf_leftovers() -> int:
    """Delete the CPFs an earlier version cached or recorded (this one never does: cpf_answers.py).

    Once per deployment: it scans every lookup record, and after the first run there is nothing
    left to find (an upgraded process writes no CPF), so a marker key says it is done.
    """
    client = services().redis
    if client.exists(_key("cpf-purged")):
        return 0
    removed = services().cache.purge_type("cpf") + services().lookups.purge_type(
        "cpf", services().events.stream_key
    )
    client.set(_key("cpf-purged"), int(time.time()))
    return removed


def health_check() -> dict:
    """Redis latency, live workers, breaker states and quota tokens; stored for /api/status."""
    client = services().redis
    started = time.perf_counter()
    client.ping()
    redis_ms = round((time.perf_counter() - started) * 1000, 2)
    breakers = {name: status.to_dict() for name, status in services().breakers.status_all().items()}
    quotas = services().rate_limiter.status_all()
    workers = live_workers()
    # A batch whose step chain broke (its worker lost) gets a new step (batches.BatchStore.status).
    running_batches = [services().batches.status(batch_id) for batch_id in services().batches.running_ids()]
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
        "batches_running": sum(1 for batch in running_batches if batch is not None),
    }
    client.set(_key("health"), orjson.dumps(report))
    log.info("health check: %s", "healthy" if not problems else "; ".join(problems))
    return report


def last_report(name: str) -> dict | None:
    """The last stored `health` or `cleanup` report."""
    raw = services().redis.get(_key(name))
    return orjson.loads(raw) if raw else None
