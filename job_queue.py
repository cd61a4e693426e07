"""The Celery worker's and beat's entry point (`celery -A job_queue worker|beat`): the tasks, the
beat schedule's jobs and the worker hooks.

Wired like Flask's examples/celery: `celery_app` is given the app factory (`app.create_app`) and
builds its Flask app lazily, in the worker process, on the first task; every task runs inside that
app's context and calls one plain function of the engine (`pipeline`, `maintenance`, the batch
runner).  The Celery app itself and its configuration live in enrich/celery_setup.py, which the web
app uses to send tasks by name.
"""

from __future__ import annotations

import logging
import socket
import time

from celery import Task, shared_task
from celery.signals import (
    beat_init,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
)

from app import create_app
from enrich import log_setup, maintenance, metrics, pipeline
from enrich.celery_setup import LookupCelery
from enrich.deferred_calls import DeferredCalls, Dispatcher
from enrich.services import services
from enrich.settings import Settings
from enrich.task_messages import LookupTask, SourceCallTask

log = logging.getLogger("job_queue")


# Fetch and finalize tasks store no result: their outcome is the source's state in the lookup
# record, which /api/tasks reads (`task_status`).  A result per task cost two GET+SET pairs
# (STARTED, then SUCCESS) and ~600 bytes kept for two days; only a task that raised stores one.
# The fetch tasks' positional arguments are their payload class's fields, in order (task_messages.py);
# `payload` names the class, for their log lines' lookup and source too (log_setup.bind_task).
@shared_task(
    name="job_queue.fetch_source",
    bind=True,
    ignore_result=True,
    store_errors_even_if_ignored=True,
    payload=SourceCallTask,
)
def fetch_source(self: Task, *payload: object) -> dict:
    """Call one source for one lookup (never sleeps; waits go to the deferred set).  Its later
    sends (a wait, a retry) keep this task's id, the source's call id."""
    return pipeline.run_source_call(services(), SourceCallTask(*payload), call_id=self.request.id)


@shared_task(
    name="job_queue.fetch_lookup", ignore_result=True, store_errors_even_if_ignored=True, payload=LookupTask
)
def fetch_lookup(*payload: object) -> dict:
    """Call all of a lookup's missing sources at once (waits and retries go out as fetch_source)."""
    return pipeline.run_lookup_calls(services(), LookupTask(*payload))


@shared_task(name="job_queue.finalize_lookup", ignore_result=True, store_errors_even_if_ignored=True)
def finalize_lookup(lookup_id: str, at_deadline: bool = False) -> str | None:
    """Merge and cross-check a lookup (at its deadline, or when its last source settled)."""
    return pipeline.finalize(services(), lookup_id, at_deadline)


@shared_task(name="job_queue.batch_step", ignore_result=True, store_errors_even_if_ignored=True)
def batch_step(batch_id: str) -> str:
    """A bulk batch's step: collect its items' answers, start the next ones, publish progress."""
    return services().batch_runner.step(batch_id)


@shared_task(name="job_queue.cleanup")
def cleanup() -> dict:
    """Beat: expired lookups and event logs, old cache generations, stale locks."""
    return maintenance.cleanup(services())


@shared_task(name="job_queue.health_check")
def health_check() -> dict:
    """Beat: Redis, workers, breakers and quotas; the result shows in /api/status."""
    return maintenance.health_check(services())


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
            maintenance.record_worker_heartbeat(services(flask_app), hostname)
            services(flask_app).cache.flush_counts()  # counters waiting for this worker's next read
            # Gauges into the status history's current bucket, every 5 s so no 10 s bucket is
            # missed; the first worker to sample a bucket wins (maintenance.sample_status_history).
            maintenance.sample_status_history(services(flask_app))
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


celery_app = LookupCelery(Settings.from_env(), app_factory=create_app)
# `celery worker|beat` log in LOG_FORMAT, each task's lines with its id and lookup (log_setup).
log_setup.connect_celery(lambda: celery_app.settings)
