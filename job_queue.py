"""Celery app, tasks, beat schedule and worker hooks: `celery -A job_queue worker|beat`.

Wired like Flask's examples/celery: tasks run inside a Flask app context and call plain
functions in `pipeline` and `maintenance`.  The module-level `celery_app` is configured from
the environment for the worker and beat command lines; its Flask app is built lazily, in the
worker process, on the first task.  The web app builds its own Celery instance (`init_app`).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from datetime import UTC, datetime

from celery import Celery, Task, shared_task
from celery.result import AsyncResult
from celery.signals import (
    beat_init,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
)
from flask import Flask

from enrich import log_setup, maintenance, metrics, pipeline, redis_broker, status_history
from enrich.deferred_calls import DeferredCalls, Dispatcher
from enrich.extensions import services
from enrich.lookups import LookupStore, SourceState
from enrich.settings import Settings

log = logging.getLogger("job_queue")
redis_broker.install()  # kombu's Redis transport, fixed to survive a lost broker with tasks running

PRIORITY_LEVELS = redis_broker.PRIORITY_STEPS
DEFAULT_QUEUE = redis_broker.DEFAULT_QUEUE


class FlaskTask(Task):
    """A task that runs inside the app context of its Celery app's Flask app."""

    def __call__(self, *args, **kwargs):
        with self.app.flask_app.app_context():
            return self.run(*args, **kwargs)


class LookupCelery(Celery):
    """Celery with a Flask app attached (given, or built lazily from the same settings)."""

    def __init__(self, settings: Settings, flask_app: Flask | None = None) -> None:
        super().__init__("job_queue", task_cls=FlaskTask)
        self.settings = settings
        self._flask_app = flask_app
        self._flask_lock = threading.Lock()
        self.conf.update(celery_config(settings))

    @property
    def flask_app(self) -> Flask:
        with self._flask_lock:
            if self._flask_app is None:
                from app import create_app  # the web app imports this module: import it late

                # A worker runs up to 4 source calls per pool thread at once (call_pool), each
                # making a few Redis calls: a pool of the web's size made them queue for it.
                pooled = max(self.settings.redis_max_connections, self.settings.worker_concurrency * 2)
                settings = dataclasses.replace(self.settings, redis_max_connections=pooled)
                self._flask_app = create_app(settings, celery=self)
            return self._flask_app


def celery_config(settings: Settings) -> dict:
    """Broker, backend and worker settings (see the README's reliability notes)."""
    url = settings.effective_redis_url
    prefix = redis_broker.broker_prefix(settings.key_prefix)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # kombu sweeps for a dead worker's unacknowledged tasks only every 10 s x 10 calls by
        # default (~100 s whatever the visibility timeout); sweep every fifth of it instead.
        "unacked_restore_interval": redis_broker.sweep_interval(settings.visibility_timeout),
        "unacked_restore_throttle": 1,
        "priority_steps": PRIORITY_LEVELS,
        "sep": ":",
        "queue_order_strategy": "priority",
        "global_keyprefix": prefix,
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
        "retry_on_timeout": True,
        "health_check_interval": 10,
    }
    return {
        "broker_url": url,
        "result_backend": redis_broker.result_backend_url(url),
        "broker_transport_options": transport,
        "result_backend_transport_options": {"global_keyprefix": prefix},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "redis_socket_timeout": 5,
        "redis_max_connections": 4,  # result backend pool
        "broker_pool_limit": settings.broker_pool_limit,  # producer connections per process
        "redis_socket_connect_timeout": 2,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": 10,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": DEFAULT_QUEUE,
        "task_default_priority": 5,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": False,
        "result_extended": True,
        "result_expires": settings.lookup_record_ttl,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_pool": "threads",
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "beat_schedule": {
            # Ahead of any backlog of lookups (0 is served first), or a busy queue would hide its own health.
            "cleanup": {
                "task": "job_queue.cleanup",
                "schedule": settings.cleanup_interval,
                "options": {"priority": 0},
            },
            "health-check": {
                "task": "job_queue.health_check",
                "schedule": settings.health_check_interval,
                "options": {"priority": 0},
            },
        },
        "beat_schedule_filename": f"{settings.data_dir}/celerybeat-schedule",
        "timezone": "UTC",
    }


# Fetch and finalize tasks store no result: their outcome is the source's state in the lookup
# record, which /api/tasks reads (`task_status`).  A result per task cost two GET+SET pairs
# (STARTED, then SUCCESS) and ~600 bytes kept for two days; only a task that raised stores one.
@shared_task(name="job_queue.fetch_source", ignore_result=True, store_errors_even_if_ignored=True)
def fetch_source(
    lookup_id: str,
    source: str,
    kind: str,
    value: str,
    priority: int,
    attempt: int = 0,
    reserved: bool = False,
    requeue: bool = False,
    held_since: float = 0.0,
) -> dict:
    """Call one source for one lookup (never sleeps; waits go to the deferred set)."""
    return pipeline.run_source_call(
        lookup_id, source, kind, value, priority, attempt, reserved, requeue, held_since
    )


@shared_task(name="job_queue.fetch_lookup", ignore_result=True, store_errors_even_if_ignored=True)
def fetch_lookup(lookup_id: str, kind: str, value: str, priority: int, call_ids: dict[str, str]) -> dict:
    """Call all of a lookup's missing sources at once (waits and retries go out as fetch_source)."""
    return pipeline.run_lookup_calls(lookup_id, kind, value, priority, call_ids)


@shared_task(name="job_queue.finalize_lookup", ignore_result=True, store_errors_even_if_ignored=True)
def finalize_lookup(lookup_id: str, at_deadline: bool = False) -> str | None:
    """Merge and cross-check a lookup (at its deadline, or when its last source settled)."""
    return pipeline.finalize(lookup_id, at_deadline)


@shared_task(name="job_queue.batch_step", ignore_result=True, store_errors_even_if_ignored=True)
def batch_step(batch_id: str) -> str:
    """A bulk batch's step: collect its items' answers, start the next ones, publish progress."""
    return services().batches.step(batch_id)


@shared_task(name="job_queue.cleanup")
def cleanup() -> dict:
    """Beat: expired lookups and event logs, old cache generations, stale locks."""
    return maintenance.cleanup()


@shared_task(name="job_queue.health_check")
def health_check() -> dict:
    """Beat: Redis, workers, breakers and quotas; the result shows in /api/status."""
    return maintenance.health_check()


# Celery states for a fetch task, read off its source's state in the lookup record.  The task
# itself never sleeps: a call waiting for a token or a retry is a new send of the same task id.
_TASK_STATES = {
    SourceState.PENDING: "PENDING",
    SourceState.RUNNING: "STARTED",
    SourceState.RETRYING: "RETRY",
    SourceState.RATE_LIMITED: "PENDING",  # waiting for its token (settled ones are SUCCESS below)
}


def task_status(celery: Celery, store: LookupStore, task_id: str) -> dict | None:
    """/api/tasks: what became of a task the service issued; None for an id it never issued."""
    issued = store.task(task_id)
    if issued is None:
        return None
    body = {
        "task_id": task_id,
        "name": issued["name"],
        "state": "PENDING",
        "lookup_id": issued["lookup_id"],
        "source": issued.get("source"),
        "result": None,
        "date_done": None,
    }
    # Only a task that raised has a stored result.  A joined request's call id stands for the shared
    # lookup's call, whose real task id its registry entry keeps (never shown).
    failed = AsyncResult(issued.get("task_id") or task_id, app=celery)
    if failed.state == "FAILURE":
        del body["result"]
        body.update(state="FAILURE", error=repr(failed.result))
        body["date_done"] = failed.date_done.isoformat() if failed.date_done else None
        return body
    lookup = store.get(issued["lookup_id"]) if issued["lookup_id"] else None
    result = lookup.sources.get(issued.get("source") or "") if lookup else None
    if result is None:
        return body
    if result.settled:
        body["state"] = "SUCCESS"
        body["result"] = {k: v for k, v in result.to_dict().items() if k != "data"}
        if result.updated_at:
            body["date_done"] = datetime.fromtimestamp(result.updated_at, UTC).isoformat()
    else:
        body["state"] = _TASK_STATES.get(result.state, "PENDING")
    return body


# -- worker and beat hooks -------------------------------------------------------------------

_dispatchers: list[Dispatcher] = []


@worker_ready.connect
def _start_dispatcher(sender=None, **_) -> None:
    """Every worker moves due deferred calls onto the broker and reports a heartbeat."""
    celery: LookupCelery = sender.app
    flask_app = celery.flask_app
    hostname = sender.hostname or socket.gethostname()
    deferred = DeferredCalls(services(flask_app).redis, celery.settings)
    last_beat = [0.0]

    def send(task: str, args: list, options: dict) -> None:
        celery.send_task(task, args=args, **options)

    def heartbeat() -> None:
        if time.monotonic() - last_beat[0] >= 5:
            maintenance.record_worker_heartbeat(flask_app, hostname)
            services(flask_app).cache.flush_counts()  # counters waiting for this worker's next read
            # Gauges into the status history's current bucket, every 5 s so no 10 s bucket is
            # missed; the first worker to sample a bucket wins (status_history.sample).
            with flask_app.app_context():
                status_history.sample()
            last_beat[0] = time.monotonic()

    dispatcher = Dispatcher(deferred, send, celery.settings.deferred_poll_interval, on_tick=heartbeat)
    dispatcher.start()
    _dispatchers.append(dispatcher)
    log.info("deferred-call dispatcher started on %s", hostname)


@worker_ready.connect
def _serve_metrics(sender=None, **_) -> None:
    """Every worker serves its own /metrics (WORKER_METRICS_HOST:WORKER_METRICS_PORT; port 0: none)."""
    settings: Settings = sender.app.settings
    metrics.serve_worker_metrics(settings.worker_metrics_host, settings.worker_metrics_port, sender.hostname)


@task_prerun.connect
def _task_started(task_id=None, task=None, **_) -> None:
    metrics.task_started(task.name, task_id)


@task_postrun.connect
def _task_finished(task_id=None, task=None, state=None, **_) -> None:
    metrics.task_finished(task.name, task_id, state)


@worker_shutdown.connect
def _stop_dispatcher(**_) -> None:
    for dispatcher in _dispatchers:
        dispatcher.stop()


@beat_init.connect
def _health_check_at_start(sender=None, **_) -> None:
    """Run the health check once when beat starts, not only after the first interval."""
    sender.app.send_task("job_queue.health_check")


celery_app = LookupCelery(Settings.from_env())
# `celery worker|beat` log in LOG_FORMAT, each task's lines with its id and lookup (log_setup).
log_setup.connect_celery(lambda: celery_app.settings)
