"""job_queue.py and enrich/celery_setup.py: the worker's tasks, the Celery app and its configuration,
and what became of an issued task.

The tasks' functions run in an app context on the real parts (the test Redis, the sandbox upstream
over HTTP), and once end to end on an in-process Celery worker (celery.contrib.testing) consuming
the test Redis's broker lists.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime

import pytest
from celery.contrib.testing.worker import start_worker
from conftest import wait_for
from flask import Flask

import job_queue
from app import close_app, create_app
from enrich import log_setup, maintenance, pipeline, redis_broker
from enrich.celery_setup import LookupCelery, celery_config, task_status
from enrich.identifiers import parse
from enrich.lookups import SourceResult, SourceState
from enrich.services import services
from enrich.settings import Settings
from enrich.task_messages import FETCH_TASK, LookupTask, SourceCallTask

TASK_NAMES = {
    "job_queue.fetch_source": job_queue.fetch_source,
    "job_queue.fetch_lookup": job_queue.fetch_lookup,
    "job_queue.finalize_lookup": job_queue.finalize_lookup,
    "job_queue.batch_step": job_queue.batch_step,
    "job_queue.cleanup": job_queue.cleanup,
    "job_queue.health_check": job_queue.health_check,
}


@pytest.fixture
def app(make_sandbox_app):
    """An in-process app on the test Redis whose sources are the sandbox's (no worker)."""
    return make_sandbox_app({})


# -- the Celery app and its configuration ------------------------------------------------------


def test_every_task_is_registered_on_the_worker_app_under_its_name():
    registered = job_queue.celery_app.tasks
    for name, task in TASK_NAMES.items():
        assert name in registered and task.name == name
        # The same function (a bound task's `run` is a method of its own task object).
        assert getattr(registered[name].run, "__func__", registered[name].run) is getattr(
            task.run, "__func__", task.run
        )
    # The fetch tasks' outcome is the lookup record; beat's two keep their report as a result.
    assert all(registered[name].ignore_result for name in TASK_NAMES if name.startswith("job_queue.f"))
    assert not registered["job_queue.cleanup"].ignore_result
    assert not registered["job_queue.health_check"].ignore_result


def test_a_celery_app_given_the_app_factory_builds_the_service_app_attached_to_itself(settings, redis_client):
    celery = LookupCelery(settings, app_factory=create_app)
    flask_app = celery.flask_app
    try:
        assert services(flask_app).celery is celery and celery.flask_app is flask_app
        built = services(flask_app).settings
        assert built.key_prefix == settings.key_prefix
        assert built.redis_max_connections == max(
            settings.redis_max_connections, 2 * settings.worker_concurrency
        )
    finally:
        close_app(flask_app)


def test_the_celery_config_acks_late_prefetches_one_and_follows_the_settings(settings):
    changed = Settings.from_env(
        {},
        redis_url=settings.redis_url,
        key_prefix="kp",
        visibility_timeout=30,
        cleanup_interval=600.0,
        health_check_interval=45.0,
        worker_concurrency=3,
    )

    config = celery_config(changed)

    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_concurrency"] == 3
    assert config["broker_url"] == settings.redis_url and config["worker_pool"] == "threads"
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] == 30 and transport["unacked_restore_interval"] == 6
    assert transport["priority_steps"] == list(range(10)) and transport["queue_order_strategy"] == "priority"
    assert transport["global_keyprefix"] == "kp:celery:"
    assert config["result_backend_transport_options"] == {"global_keyprefix": "kp:celery:"}
    assert config["result_expires"] == changed.lookup_record_ttl
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert config["beat_schedule"] == {
        "cleanup": {"task": "job_queue.cleanup", "schedule": 600.0, "options": {"priority": 0}},
        "health-check": {"task": "job_queue.health_check", "schedule": 45.0, "options": {"priority": 0}},
    }


def test_a_celery_app_builds_its_flask_app_from_the_factory_once_whatever_the_threads_asking(settings):
    calls: list[tuple[Settings, LookupCelery]] = []
    arrived: list[int] = []
    release = threading.Event()
    built = Flask("built")

    def factory(given: Settings, celery: LookupCelery) -> Flask:
        calls.append((given, celery))
        release.wait(10)  # the first build is slow: every other thread asks meanwhile
        return built

    def ask(results: list[Flask]) -> None:
        arrived.append(1)
        results.append(celery.flask_app)

    celery = LookupCelery(dataclasses.replace(settings, worker_concurrency=9), app_factory=factory)
    try:
        assert calls == []  # nothing built until asked
        seen: list[Flask] = []
        threads = [threading.Thread(target=ask, args=(seen,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: calls and len(arrived) == 8, message="every thread asking")
        # Half a second for a second build to begin, as it would without the lock.
        deadline = time.monotonic() + 0.5
        while len(calls) == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for thread in threads:
            thread.join(10)
        assert len(calls) == 1 and seen == [built] * 8
        given, passed = calls[0]
        assert passed is celery
        # A worker's pool: at least two connections per task thread.
        assert given.redis_max_connections == max(settings.redis_max_connections, 18)
        assert celery.flask_app is built and len(calls) == 1
    finally:
        release.set()
        celery.close()


def test_a_celery_app_given_neither_a_flask_app_nor_a_factory_cannot_run_tasks(settings):
    sender = LookupCelery(settings)
    try:
        with pytest.raises(RuntimeError, match="no Flask app nor app factory"):
            _ = sender.flask_app
    finally:
        sender.close()


# -- task_status -----------------------------------------------------------------------------


def test_task_status_is_none_for_an_id_the_service_never_issued(parts):
    assert task_status(parts.celery, parts.lookups, "not-a-task-we-issued") is None


def test_task_status_follows_its_source_from_pending_to_success(parts, sandbox):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=101)))
    task_id = lookup.tasks["viacep"]

    def status() -> dict:
        return task_status(parts.celery, parts.lookups, task_id)

    pending = status()
    assert pending == {
        "task_id": task_id,
        "name": FETCH_TASK,
        "state": "PENDING",
        "lookup_id": lookup.id,
        "source": "viacep",
        "result": None,
        "date_done": None,
    }
    pipeline.settle(parts, lookup.id, SourceResult("viacep", SourceState.RUNNING))
    assert status()["state"] == "STARTED"
    pipeline.settle(
        parts, lookup.id, SourceResult("viacep", SourceState.RETRYING, scheduled_at=time.time() + 5)
    )
    assert status()["state"] == "RETRY"

    pipeline.run_source_call(
        parts, SourceCallTask(lookup.id, "viacep", "cep", lookup.identifier, 5), call_id=task_id
    )

    done = status()
    assert done["state"] == "SUCCESS" and done["result"]["state"] == "ok" and "data" not in done["result"]
    assert datetime.fromisoformat(done["date_done"]).timestamp() == pytest.approx(time.time(), abs=30)


def test_task_status_of_a_joined_requests_call_id_names_its_own_lookup(parts, sandbox):
    cep = parse(sandbox.known("cep", seed=102))
    first, _ = pipeline.start_lookup(parts, cep)
    joined, _ = pipeline.start_lookup(parts, cep)
    pipeline.settle(parts, first.id, SourceResult("viacep", SourceState.NOT_FOUND))

    body = task_status(parts.celery, parts.lookups, joined.tasks["viacep"])

    assert body["lookup_id"] == joined.id and body["task_id"] == joined.tasks["viacep"]
    assert body["state"] == "SUCCESS" and body["result"]["state"] == "not_found"
    assert first.id not in str(body) and first.tasks["viacep"] not in str(body)


# -- the tasks' functions in an app context ----------------------------------------------------


def test_fetch_source_run_with_a_payload_list_settles_that_source(parts, sandbox):
    cep = sandbox.known("cep", seed=103)
    lookup, _ = pipeline.start_lookup(parts, parse(cep))
    payload = SourceCallTask(lookup.id, "viacep", "cep", cep, lookup.priority).args()

    outcome = job_queue.fetch_source.run(*payload)

    assert outcome["source"] == "viacep" and outcome["state"] == "ok"
    stored = parts.lookups.get(lookup.id)
    assert stored.sources["viacep"].state == "ok" and stored.sources["brasilapi"].state == "pending"
    assert sandbox.served("viacep") == 1


def test_fetch_lookup_then_finalize_lookup_run_complete_the_lookup_once(parts, sandbox):
    cep = sandbox.known("cep", seed=104)
    lookup, _ = pipeline.start_lookup(parts, parse(cep))
    payload = LookupTask(lookup.id, "cep", cep, lookup.priority, lookup.tasks).args()

    outcomes = job_queue.fetch_lookup.run(*payload)

    assert {name: outcome["state"] for name, outcome in outcomes.items()} == {
        "brasilapi": "ok",
        "viacep": "ok",
    }
    assert parts.lookups.get(lookup.id).status == "complete"
    assert job_queue.finalize_lookup.run(lookup.id, True) is None  # its deadline: nothing left to do


def test_finalize_lookup_run_at_the_deadline_turns_a_lookup_partial(parts, sandbox):
    lookup, _ = pipeline.start_lookup(parts, parse(sandbox.known("cep", seed=105)))

    assert job_queue.finalize_lookup.run(lookup.id, True) == "partial"
    assert parts.lookups.get(lookup.id).status == "partial"


def test_health_check_and_cleanup_run_store_their_reports(parts):
    health = job_queue.health_check.run()
    cleanup = job_queue.cleanup.run()

    assert health["redis"]["ok"] and "no live worker" in health["problems"]
    assert maintenance.last_report(parts, "health")["checked_at"] == health["checked_at"]
    assert maintenance.last_report(parts, "cleanup") == cleanup and "lookups" in cleanup["removed"]


# -- end to end on an in-process worker ------------------------------------------------------


@pytest.fixture
def worker_logging(parts):
    """Starting an embedded worker configures logging for a worker (job_queue's setup_logging hook):
    the process kind goes back to what the app set afterwards."""
    before = log_setup.configured_process()
    yield
    log_setup.configure(parts.settings, before or "web")


def test_an_in_process_worker_runs_a_lookups_task_off_the_broker_to_completion(
    parts, sandbox, worker_logging
):
    cep = sandbox.known("cep", seed=106)
    lookup, _ = pipeline.start_lookup(parts, parse(cep), priority=9)
    assert sum(maintenance.queue_depths(parts).values()) == 1

    with start_worker(parts.celery, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        done = wait_for(
            lambda: (found := parts.lookups.get(lookup.id)) and found.status == "complete" and found,
            timeout=30,
            message="the lookup to complete",
        )

    assert {name: result.state for name, result in done.sources.items()} == {
        "brasilapi": "ok",
        "viacep": "ok",
    }
    assert done.result["data"]["cep"] == cep
    assert sum(maintenance.queue_depths(parts).values()) == 0
    unacked = redis_broker.broker_prefix(parts.settings.key_prefix) + "unacked"
    assert parts.redis.hlen(unacked) == 0  # acknowledged once it ran
