"""Redis connections (short timeouts, bounded retries) and the one place keys are named.

Every key of the service lives under `settings.key_prefix` (default `enrich`); none ever holds a
CPF (cpf_answers.py):

    {p}:cache:v{schema}:g{generation}:{type}:{source}:{identifier}  cache entries (cache_manager)
    {p}:cache:kept:{type}:{source}:{identifier}:{digest}           replaced or removed entries lookup records may name (cache_manager)
    {p}:cache:generation, {p}:cache:stats                          cache generation and counters
    {p}:cache:invalidations (pub/sub channel)                      changed cache keys, for near caches (near_cache)
    {p}:breaker:{source}:state, {p}:breaker:{source}:probes        breaker state (circuit_breaker_manager)
    {p}:ratelimit:{source}, ...:starts, ...:pace                 token buckets, send slots and their pace (rate_limiter)
    {p}:lookup:{id}, {p}:lookups, {p}:inflight:{type}:{identifier} lookup records, index, single flight (lookups)
    {p}:answered:{id}, {p}:answer-body:{digest}                     lookups answered from the cache, their shared bodies (lookups)
    {p}:alias:{id}                                                 a request that joined another's lookup: its own id (lookups)
    {p}:task:{task_id}                                             issued task ids (lookups)
    {p}:deferred                                                   calls waiting for their time, lookup deadlines among them (deferred_calls)
    {p}:deadletters, {p}:deadletter:{id}                           failed calls (dead_letters)
    {p}:events:{lookup_id}, {p}:events:batch.{id}, {p}:events      per-lookup and per-batch event logs, their announcements (sse_streaming)
    {p}:flags                                                      feature flags (feature_flags)
    {p}:health, {p}:cleanup, {p}:workers, {p}:cpf-purged           last beat reports, worker heartbeats, the one-off CPF purge's marker (maintenance)
    {p}:history:{bucket start}                                     status page counters and gauges per 10 s (status_history)
    {p}:LIMITER/client/{address}/...                               per-client lookup and batch limits (client_limits, flask-limiter)
    {p}:LIMITER/admin-auth/{address}/...                           failed admin authentications (admin, limits)
    {p}:batch:{id}[:lines|:queue|:running|:items|:step|:kicked|:lost-check]  bulk batches (batches.store)
    {p}:batches, {p}:batches:unfinished, {p}:batches:inflight      batches by creation, those not finished, items in flight (batches.store)
    {p}:batches:storage                                            bytes batches hold, all and per client (batches.storage)
    {p}:celery:*                                                   broker queues, wake lists, unacknowledged tasks, results (redis_broker)

docs/architecture.md has the full map with each key's type and TTL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from enrich.settings import Settings

# The keys (globs under the prefix) that carry no TTL, each bounded some other way; every other key
# the service writes expires (tests/test_redis_store.py walks the keyspace and holds to it).
WITHOUT_TTL: tuple[str, ...] = (
    "lookups",  # index of lookup records: cleanup removes ids past LOOKUP_RETENTION
    "batches",  # index of batches: cleanup removes ids past BATCH_RETENTION
    "batches:unfinished",  # batches not finished: the finish script and cleanup remove them
    "batches:inflight",  # batch items in flight: at most BATCH_CONCURRENCY, dropped when settled or lost
    "batches:storage",  # bytes batches reserve: a field per live batch and per client holding one
    "breaker:*:state",  # one small hash per source
    "cache:generation",  # one number
    "cache:stats",  # a few counters
    "flags",  # one hash of feature flags
    "deferred",  # calls waiting for their time: each is sent when due
    "deadletters",  # capped at DEAD_LETTER_MAX
    "workers",  # heartbeats: cleanup drops the stale ones
    "health",  # the last health check's report
    "cleanup",  # the last cleanup's report
    "secret:answer-ids",  # 32 bytes: the key that seals the ids of lookups answered from the cache
    "cpf-purged",  # when cleanup removed an earlier version's CPFs (once per deployment)
    "celery:*",  # kombu's broker keys (queues, bindings, unacknowledged): kombu's own
)


def connect(settings: Settings, url: str | None = None, **options) -> redis.Redis:
    """A client whose calls fail fast when Redis is away (no 10 s of default retries).

    The pool is bounded and blocking: a burst of greenlets (a thousand event streams opening at
    once) queues for `redis_max_connections` connections instead of opening one each.
    Responses stay bytes (`decode_responses=False`): pybreaker's Redis storage needs that.
    """
    timeout = settings.redis_socket_timeout
    params = dict(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # Only connection errors are retried: an explicit Retry would otherwise retry timeouts
        # too (whatever retry_on_timeout says), doubling the wait on a hung server.
        retry=Retry(
            ExponentialBackoff(cap=0.2, base=0.02), retries=1, supported_errors=(redis.ConnectionError,)
        ),
        retry_on_timeout=False,
        health_check_interval=30,
        max_connections=settings.redis_max_connections,
        timeout=timeout,  # the longest wait for a free pooled connection
    )
    params.update(options)
    pool = redis.BlockingConnectionPool.from_url(url or settings.effective_redis_url, **params)
    return redis.Redis(connection_pool=pool)


def key(settings: Settings, *parts: object) -> str:
    """Build a key under the service prefix: key(s, "lookup", id) -> "enrich:lookup:<id>"."""
    return ":".join((settings.key_prefix, *(str(part) for part in parts)))


def follow_channel(
    settings: Settings,
    channel: str,
    stopping: threading.Event,
    on_message: Callable[[bytes], None],
    on_subscribed: Callable[[], None],
    on_lost: Callable[[Exception, float], None],
) -> None:
    """Read one pub/sub channel until `stopping` is set, on a connection of its own.

    `on_subscribed` runs at every (re)subscription, also after redis-py's own silent reconnect:
    anything published meanwhile was missed, which the caller must assume.  A lost connection
    calls `on_lost(error, backoff)`, waits `backoff` seconds (doubling from 50 ms up to 2 s) and
    subscribes again.
    """
    backoff = 0.05
    while not stopping.is_set():
        client = connect(settings, max_connections=2)
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(channel)
            while not stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "message":
                    on_message(message["data"])
                elif message["type"] == "subscribe":
                    backoff = 0.05
                    on_subscribed()
        except (redis.RedisError, OSError) as error:
            on_lost(error, backoff)
            stopping.wait(backoff)
            backoff = min(2.0, backoff * 2)
        finally:
            try:
                pubsub.close()
                client.close()
            except (redis.RedisError, OSError):
                pass
