"""The Celery ceiling's app: the service's own Celery configuration with one no-op task.

`celery -A bench.baselines.celery_noop worker ...` runs a worker on exactly the broker, backend
and worker settings of `enrich.celery_setup.LookupCelery` (key prefix, priorities, acks late, prefetch 1,
track started, extended results); the task only increments a Redis counter, so that the
benchmark can count completions without a result backend.  BENCH_NO_RESULTS=1 drops the result
backend (the "without results" ceiling).
"""

from __future__ import annotations

import os

import redis

from app import create_app
from enrich.celery_setup import LookupCelery
from enrich.settings import Settings

TASK = "bench.noop"
settings = Settings.from_env()
app = LookupCelery(settings, app_factory=create_app)
if os.environ.get("BENCH_NO_RESULTS") == "1":
    app.conf.update(result_backend=None, task_ignore_result=True, task_track_started=False)

COUNTER_KEY = f"{settings.key_prefix}:bench:noop:done"
_client: redis.Redis | None = None


def counter() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.effective_redis_url)
    return _client


@app.task(name=TASK)
def noop() -> None:
    """Nothing but the completion count (one INCR)."""
    counter().incr(COUNTER_KEY)
