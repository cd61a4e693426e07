"""Prometheus metrics: the counters move with real lookups, gunicorn's workers add up, workers serve
their own, the cluster state comes from Redis, a scrape survives Redis down, the alert rules hold."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import FAST_LIMITS, ROOT, wait_for
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich import pipeline
from enrich.identifiers import parse
from enrich.lookups import SourceResult, SourceState
from enrich.services import services
from enrich.settings import Settings
from enrich.task_messages import SourceCallTask, celery_priority

CEP_SOURCES = ("brasilapi", "viacep")


def parse_samples(text: str) -> list:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def scrape(app) -> list:
    response = app.test_client().get("/metrics")
    assert response.status_code == 200, response.text
    assert response.content_type.startswith("text/plain")
    return parse_samples(response.get_data(as_text=True))


def scrape_url(url: str) -> list:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return parse_samples(response.text)


@pytest.fixture
def app(make_sandbox_app):
    """An in-process app on the test Redis whose sources are the sandbox's (no worker)."""
    return make_sandbox_app(defer_horizon=5.0)  # ReceitaWS's second token (21 s away) is past it


# -- in process: the pipeline's paths -------------------------------------------------------


def test_source_calls_are_counted_by_outcome_and_a_finished_lookup_by_type(app, sandbox):
    cep = sandbox.known("cep", seed=21)
    before = scrape(app)
    with app.app_context():
        lookup, created = pipeline.start_lookup(services(), parse(cep))
        assert created and lookup.status == "queued"
        services(app).breakers.force_open("brasilapi")
        for source in CEP_SOURCES:
            pipeline.run_source_call(
                services(),
                SourceCallTask(lookup.id, source, "cep", lookup.identifier, 5),
                call_id=lookup.tasks[source],
            )
        assert services(app).lookups.get(lookup.id).status == "complete"
    after = scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("enrich_source_requests_total", source="viacep", outcome="ok") == 1
    assert delta("enrich_source_request_duration_seconds_count", source="viacep") == 1
    assert delta("enrich_source_request_duration_seconds_sum", source="viacep") > 0
    # No request went out through the open breaker, so no latency either.
    assert delta("enrich_source_requests_total", source="brasilapi", outcome="breaker_open") == 1
    assert delta("enrich_source_request_duration_seconds_count", source="brasilapi") == 0
    assert (
        delta("enrich_breaker_transitions_total", source="brasilapi", from_state="closed", to_state="open")
        == 1
    )
    assert delta("enrich_lookups_total", type="cep", outcome="complete") == 1
    assert delta("enrich_lookup_duration_seconds_count", type="cep", outcome="complete") == 1
    assert delta("enrich_cache_reads_total", type="cep", result="miss") >= 2
    assert delta("enrich_events_published_total", type="complete") == 1
    assert delta("enrich_events_published_total", type="source") >= 4  # running, then settled, per source


def test_a_lookup_is_counted_once_at_its_first_answer_partial_or_failed(app, sandbox):
    late, failing = sandbox.identifiers("cep", 2, seed=22)
    before = scrape(app)
    with app.app_context():
        partial, _ = pipeline.start_lookup(services(), parse(late))
        assert pipeline.finalize(services(), partial.id, at_deadline=True) == "partial"
        failed, _ = pipeline.start_lookup(services(), parse(failing))
        for lookup in (partial, failed):  # every source gives up: the partial one completes as well
            for source in CEP_SOURCES:
                pipeline.settle(
                    services(), lookup.id, SourceResult(source, SourceState.ERROR, error="gave up")
                )
        assert services(app).lookups.get(partial.id).status == "complete"
    after = scrape(app)

    def delta(outcome: str) -> float:
        name = "enrich_lookups_total"
        return value(after, name, type="cep", outcome=outcome) - value(
            before, name, type="cep", outcome=outcome
        )

    assert delta("partial") == 1
    assert delta("failed") == 1  # the lookup whose sources all failed
    assert delta("complete") == 0  # the partial one's later completion is not a second answer


def test_rate_limit_waits_are_counted_per_source_and_reason(app, sandbox):
    cep, cnpj = sandbox.known("cep", seed=23), sandbox.known("cnpj", seed=23)
    before = scrape(app)
    with app.app_context():
        limiter = services(app).rate_limiter
        company, _ = pipeline.start_lookup(services(), parse(cnpj))
        place, _ = pipeline.start_lookup(services(), parse(cep))
        for source in ("viacep", "receitaws"):  # buckets now empty (burst and interactive reserve)
            assert all(limiter.reserve(source).granted for _ in range(limiter.capacity(source)))
        waiting = pipeline.run_source_call(
            services(), SourceCallTask(place.id, "viacep", "cep", cep, 5), call_id=place.tasks["viacep"]
        )
        refused = pipeline.run_source_call(
            services(),
            SourceCallTask(company.id, "receitaws", "cnpj", cnpj, 5),
            call_id=company.tasks["receitaws"],
        )
    assert waiting["state"] == "rate_limited" and waiting["scheduled_at"] is not None
    assert refused["state"] == "rate_limited" and refused["scheduled_at"] is None
    after = scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("enrich_rate_limit_delays_total", source="viacep", reason="reserved") == 1
    assert delta("enrich_rate_limit_delay_seconds_total", source="viacep") > 0
    assert delta("enrich_rate_limit_delays_total", source="receitaws", reason="exhausted") == 1
    assert delta("enrich_source_requests_total", source="viacep") == 0  # neither call went out


# -- in process: the cluster state read from Redis ------------------------------------------


def test_batches_are_seen_by_the_scrape_and_the_status(app, sandbox):
    from enrich.batches import input as batch_input

    with app.app_context():  # no worker: the batch stays queued
        batch = services(app).batches.create(
            batch_input.parse_json(sandbox.identifiers("cep", 3, seed=29), 10)
        )
    samples = scrape(app)
    assert value(samples, "enrich_batches_running") == 1
    assert value(samples, "enrich_batch_items_pending") == 3
    assert value(samples, "enrich_batch_items_in_flight") == 0
    status = app.test_client().get("/api/status").get_json()["batches"]
    assert status == {"running": 1, "items_pending": 3, "items_in_flight": 0}
    with app.app_context():
        services(app).batch_runner.cancel(batch["id"])
    assert value(scrape(app), "enrich_batches_running") == 0


def test_the_scrape_reports_breakers_queues_tokens_and_dead_letters_from_redis(app, sandbox):
    added_before = value(scrape(app), "enrich_dead_letters_added_total", source="viacep")
    with app.app_context():
        services(app).breakers.force_open("viacep")
        services(app).dead_letters.add("lookup-id", "viacep", "cep", "01310100", 5, "timeout", 5)
        services(app).celery.send_task("job_queue.cleanup", priority=celery_priority(7))
        services(app).deferred.add(time.time() + 600, "job_queue.cleanup", [])
        assert services(app).rate_limiter.reserve("receitaws").granted
    samples = scrape(app)
    assert value(samples, "enrich_redis_up") == 1
    assert value(samples, "enrich_breaker_state", source="viacep", state="open") == 1
    assert value(samples, "enrich_breaker_state", source="viacep", state="closed") == 0
    assert value(samples, "enrich_breaker_state", source="brasilapi", state="closed") == 1
    assert value(samples, "enrich_dead_letters") == 1
    assert value(samples, "enrich_dead_letters_added_total", source="viacep") - added_before == 1
    assert value(samples, "enrich_queue_depth", priority="7") == 1
    assert value(samples, "enrich_queue_depth") == 1  # all priorities together
    assert value(samples, "enrich_deferred_calls") == 1
    # A full bucket holds its burst (1), the interactive reserve (2) and a dispatcher round's refill
    # (ViaCEP: 9.5/s x 0.2 s, 2 tokens; ReceitaWS: none); one token of ReceitaWS's is taken.
    assert 1.9 < value(samples, "enrich_rate_limit_tokens", source="receitaws") < 2.5
    assert value(samples, "enrich_rate_limit_tokens", source="viacep") == 5
    assert value(samples, "enrich_rate_limit_per_minute", source="receitaws") == pytest.approx(2.85)
    assert value(samples, "enrich_workers_live") == 0


def test_with_redis_down_the_scrape_answers_with_redis_up_zero():
    settings = Settings.from_env(
        {}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="tmetrics-down"
    )
    app = create_app(settings)
    try:
        started = time.monotonic()
        samples = scrape(app)
        assert time.monotonic() - started < 5
        assert value(samples, "enrich_redis_up") == 0
        names = {s.name for s in samples}
        assert "python_info" in names and "enrich_event_streams_open" in names  # the process's own
        assert "enrich_breaker_state" not in names and "enrich_queue_depth" not in names
    finally:
        close_app(app)


# -- real processes: a Celery worker's port, gunicorn with two workers ----------------------


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    """gunicorn with two workers and one Celery worker serving its metrics on a port of its own."""
    from stack import Stack

    stack = Stack(
        redis_url,
        sandbox_url,
        tmp_path_factory.mktemp("metrics"),
        WORKER_METRICS_PORT=free_port(),
        **FAST_LIMITS,
    )
    try:
        stack.start_worker()
        stack.start_web(workers=2)
        yield stack
    finally:
        stack.stop()


def worker_url(stack) -> str:
    return f"http://127.0.0.1:{stack.settings.worker_metrics_port}"


def test_a_celery_worker_serves_its_task_and_source_metrics_on_its_port(stack, sandbox):
    before = scrape_url(worker_url(stack))
    created = stack.post_lookup(sandbox.known("cep", seed=31))
    assert created.status_code == 202, created.text
    stack.wait_status(created.json()["id"])

    def delta(samples: list, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    def task_done() -> list | None:
        samples = scrape_url(worker_url(stack))
        done = delta(samples, "enrich_tasks_total", task="job_queue.fetch_lookup", state="SUCCESS")
        return samples if done >= 1 else None

    after = wait_for(task_done, timeout=10, message="the worker to count its fetch_lookup task")
    assert delta(after, "enrich_task_duration_seconds_count", task="job_queue.fetch_lookup") >= 1
    assert value(after, "enrich_tasks_in_progress", task="job_queue.fetch_lookup") == 0
    for source in CEP_SOURCES:
        assert delta(after, "enrich_source_requests_total", source=source, outcome="ok") == 1
        assert delta(after, "enrich_source_request_duration_seconds_count", source=source) == 1
    assert delta(after, "enrich_lookups_total", type="cep", outcome="complete") == 1
    assert delta(after, "enrich_events_published_total", type="complete") == 1
    # A worker serves its own metrics only: the cluster state is the web app's.
    assert "enrich_breaker_state" not in {s.name for s in after}


def test_gunicorn_workers_add_up_in_one_scrape(stack, sandbox):
    cep = sandbox.known("cep", seed=32)
    stack.wait_status(stack.post_lookup(cep).json()["id"])  # cached from now on
    metrics_dir = Path(stack.settings.effective_metrics_dir)
    name = "enrich_lookups_total"
    baseline = value(scrape_url(stack.web_url), name, type="cep", outcome="cached")

    def per_worker() -> list[float]:
        counts = []
        for path in metrics_dir.glob("counter_*.db"):
            merged = MultiProcessCollector.merge([str(path)])
            counts.append(value([s for m in merged for s in m.samples], name, type="cep", outcome="cached"))
        return counts

    sent = 0

    def both_served() -> bool:
        nonlocal sent
        for _ in range(10):  # a new connection each: the kernel hands them to either worker
            answer = requests.post(f"{stack.web_url}/api/lookups", json={"identifier": cep}, timeout=10)
            assert answer.status_code == 200 and answer.json()["cached"] is True
            sent += 1
        return len([count for count in per_worker() if count > 0]) >= 2

    wait_for(both_served, timeout=30, interval=0, message="both gunicorn workers to serve cached lookups")
    samples = scrape_url(stack.web_url)
    assert value(samples, name, type="cep", outcome="cached") - baseline == sent
    assert sum(per_worker()) == value(samples, name, type="cep", outcome="cached")
    assert value(samples, "enrich_redis_up") == 1  # and the cluster state rides along
    assert value(samples, "enrich_workers_live") >= 1
    assert value(samples, "enrich_breaker_state", source="viacep", state="closed") == 1


def test_a_second_worker_on_a_taken_metrics_port_warns_and_keeps_working(stack, sandbox):
    stack.start_worker("w2")  # same WORKER_METRICS_PORT as w1: it returns once w2's heartbeat is in
    wait_for(lambda: "serves no metrics: cannot listen" in stack.log("w2"), message="the port warning")
    assert stack.processes["w2"][0].poll() is None
    stack.kill("w1")
    created = stack.post_lookup(sandbox.known("cep", seed=33))
    assert stack.wait_status(created.json()["id"])["status"] == "complete"  # w2 does the work


def test_stacks_turn_worker_metrics_off_unless_a_test_names_a_port(tmp_path):
    from stack import Stack

    assert Stack("redis://x", "http://127.0.0.1:1", tmp_path).settings.worker_metrics_port == 0


# -- the alert rules ------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found (Debian's prometheus package; `make test` installs it as root)",
)


@needs_promtool
def test_the_alert_rules_are_valid():
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", "docs/alerts.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


@needs_promtool
def test_every_alert_fires_in_the_rule_unit_tests():
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "docs/alerts_test.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_gunicorn_start_removes_only_the_metrics_files_of_a_previous_run(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("METRICS_DIR", str(tmp_path))
    # Loading the config (importing it too) sets this for gunicorn's processes: recorded before the
    # import, so monkeypatch puts back what this process had (a scrape of it would otherwise read
    # the directory's files instead of its own metrics).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    import gunicorn_config

    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "appendonly.aof").write_bytes(b"not ours")  # METRICS_DIR may share a directory
    importlib.reload(gunicorn_config).on_starting(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appendonly.aof"]
