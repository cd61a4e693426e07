"""The Celery app the web sends tasks with and the worker runs them in: its configuration, the
Flask app it runs tasks inside, and what became of an issued task (`/api/tasks`).

Wired like Flask's examples/celery: the worker's entry point (job_queue.py) gives `LookupCelery`
the app factory; the web app gives it itself.  Tasks are sent by name, so this module needs none
of them.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from celery import Celery, Task
from celery.result import AsyncResult
from flask import Flask

from enrich import redis_broker
from enrich.lookups import LookupStore, SourceState
from enrich.settings import Settings

PRIORITY_LEVELS = redis_broker.PRIORITY_STEPS
DEFAULT_QUEUE = redis_broker.DEFAULT_QUEUE


class FlaskTask(Task):
    """A task that runs inside the app context of its Celery app's Flask app."""

    def __call__(self, *args, **kwargs):
        with self.app.flask_app.app_context():
            return self.run(*args, **kwargs)


class LookupCelery(Celery):
    """Celery with a Flask app attached: the web's own (given), or the worker's, built lazily by the
    app factory it was given, from the same settings, on the first task.  With neither it only
    sends (a benchmark's producer) and cannot run a task."""

    def __init__(
        self,
        settings: Settings,
        flask_app: Flask | None = None,
        app_factory: Callable[..., Flask] | None = None,
    ) -> None:
        redis_broker.install()  # kombu's Redis transport, fixed to survive a lost broker with tasks running
        super().__init__("job_queue", task_cls=FlaskTask)
        self.settings = settings
        self._flask_app = flask_app
        self._app_factory = app_factory
        self._flask_lock = threading.Lock()
        self.conf.update(celery_config(settings))

    @property
    def flask_app(self) -> Flask:
        with self._flask_lock:
            if self._flask_app is None:
                if self._app_factory is None:
                    raise RuntimeError(
                        "this Celery app was given no Flask app nor app factory: it cannot run tasks"
                    )
                # A worker runs up to 4 source calls per pool thread at once (call_pool), each
                # making a few Redis calls: a pool of the web's size made them queue for it.
                pooled = max(self.settings.redis_max_connections, self.settings.worker_concurrency * 2)
                settings = dataclasses.replace(self.settings, redis_max_connections=pooled)
                self._flask_app = self._app_factory(settings, celery=self)
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
