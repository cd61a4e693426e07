"""Logs: text and JSON lines, the lookup context on them, redaction, and one lookup followed across processes."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from datetime import datetime, timedelta

import pytest
import requests
from conftest import FAST_LIMITS, wait_for

import job_queue
from app import create_app
from devstack import launcher
from enrich import call_pool, log_redaction, log_setup
from enrich.services import services
from enrich.settings import Settings

TOKEN = "log-test-admin-token-5c1e"
REDIS_PASSWORD = "log-test-redis-password-9d2f"
STACK_TOKEN = "test-admin-token"  # what tests/stack.py gives its processes


@pytest.fixture
def capture():
    """A logger of its own whose handler has the service's format, context and redaction."""
    made = []

    def make(log_format: str, process: str = "web") -> tuple[logging.Logger, io.StringIO]:
        settings = Settings.from_env(
            {},
            log_format=log_format,
            admin_token=TOKEN,
            redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:6399/0",
        )
        log_setup.redact.learn(settings)
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        log_setup.adopt(handler, settings, process)
        logger = logging.getLogger(f"test_log_setup.{len(made)}")
        logger.propagate, logger.level = False, logging.DEBUG
        logger.addHandler(handler)
        made.append((logger, handler))
        return logger, stream

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)


@pytest.fixture
def root_logging():
    """Puts the root logger (and log_setup's memory of it) back as the test found it."""
    root = logging.getLogger()
    handlers, level, configured = list(root.handlers), root.level, dict(log_setup._configured)
    formatters = {handler: handler.formatter for handler in handlers}
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    log_setup._configured.update(configured)
    for handler, formatter in formatters.items():
        handler.setFormatter(formatter)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_text_lines_show_time_level_process_logger_message_and_the_bound_context(capture):
    logger, stream = capture("text", "worker")
    logger.info("plain %s", "line")
    with log_setup.bind(
        lookup_id="L-1", source="brasilapi", task_id="T-1", task_name="job_queue.fetch_lookup"
    ):
        logger.warning("bound")
    plain, bound = stream.getvalue().splitlines()
    stamp, clock, level, process, name, message = plain.split(None, 5)
    assert datetime.strptime(f"{stamp} {clock}", "%Y-%m-%d %H:%M:%S.%fZ")
    assert (level, process, name, message) == ("INFO", "worker", f"{logger.name}:", "plain line")
    assert bound.endswith(f"{logger.name}: bound lookup=L-1 source=brasilapi task=T-1")


def test_json_lines_carry_the_fields_and_the_context_only_when_bound(capture):
    logger, stream = capture("json", "worker")
    logger.info("plain")
    with log_setup.bind(lookup_id="L-2", source="viacep", task_id="T-2", task_name="job_queue.fetch_source"):
        logger.info("bound %d", 7, extra={"state": "ok"})
        try:
            raise ValueError("broken")
        except ValueError:
            logger.exception("failed")
    plain, bound, failed = _json_lines(stream.getvalue())
    assert {k: plain[k] for k in ("level", "logger", "message", "process", "pid")} == {
        "level": "INFO",
        "logger": logger.name,
        "message": "plain",
        "process": "worker",
        "pid": os.getpid(),
    }
    assert datetime.fromisoformat(plain["time"]).utcoffset() == timedelta(0)
    assert not set(log_setup.CONTEXT_FIELDS) & set(plain) and "exc_info" not in plain
    assert bound["message"] == "bound 7" and bound["state"] == "ok"
    context = {
        "lookup_id": "L-2",
        "source": "viacep",
        "task_id": "T-2",
        "task_name": "job_queue.fetch_source",
    }
    assert {k: bound[k] for k in context} == context
    assert isinstance(failed["exc_info"], str) and "ValueError: broken" in failed["exc_info"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_never_reach_a_line_in_the_message_its_arguments_or_an_exception(capture, log_format):
    logger, stream = capture(log_format)
    url = f"redis://:{REDIS_PASSWORD}@cache.internal:6379/0"
    logger.warning("token %s in the arguments", TOKEN)
    logger.warning(f"token {TOKEN} in the message itself")
    logger.warning("headers %s", {"Authorization": "Bearer abc.def-123", "Cookie": "session=xyz789"})
    logger.warning("Authorization: Bearer abc.def-123")
    logger.warning("connecting to %s", "redis://:other-password@elsewhere:6379/1")
    try:
        raise ConnectionError(f"cannot reach {url} with {TOKEN}")
    except ConnectionError:
        logger.exception("Redis is down")
    text = stream.getvalue()
    for secret in (TOKEN, REDIS_PASSWORD, "other-password", "abc.def-123", "xyz789"):
        assert secret not in text
    assert "redis://:***@cache.internal:6379/0" in text and "redis://:***@elsewhere" in text
    assert "Redis is down" in text and "ConnectionError" in text  # the line itself survives
    if log_format == "json":
        assert len(_json_lines(text)) == 6


def test_configure_is_idempotent_and_leaves_other_handlers_alone(root_logging, settings):
    foreign = logging.StreamHandler(io.StringIO())  # as pytest's caplog handler is
    root_logging.addHandler(foreign)
    for _ in range(3):
        app = create_app(settings)
        services(app).redis.close()
    ours = [handler for handler in root_logging.handlers if getattr(handler, "_log_setup", False)]
    assert len(ours) == 1 and foreign in root_logging.handlers
    assert isinstance(ours[0].formatter, log_setup.TextFormatter)
    log_setup.configure(Settings.from_env({}, log_format="json"), "web")
    assert [h for h in root_logging.handlers if getattr(h, "_log_setup", False)] == ours
    assert isinstance(ours[0].formatter, log_setup.JsonLogFormatter)


def test_a_more_verbose_command_line_level_wins_and_outlives_the_app_factory(root_logging, settings):
    log_setup.configure(settings, "worker", level=logging.DEBUG)  # celery worker --loglevel DEBUG
    app = create_app(settings)  # the worker builds its Flask app later, with LOG_LEVEL=INFO
    services(app).redis.close()
    assert root_logging.level == logging.DEBUG and log_setup.configured_process() == "worker"
    log_setup.configure(Settings.from_env({}, log_level="WARNING"), "worker", level=logging.ERROR)
    assert root_logging.level == logging.WARNING  # LOG_LEVEL when the command line asks for less


def test_a_call_pool_thread_runs_in_the_callers_context_and_keeps_its_own_bindings(settings, capture):
    logger, stream = capture("json", "worker")
    app = create_app(settings)

    def source_call() -> dict:
        log_setup.set_context(source="opencnpj")  # discarded with the thread's copy of the context
        logger.info("in the pool")
        return log_setup.current_context()

    try:
        with log_setup.bind(lookup_id="L-3", task_id="T-3"):
            seen = call_pool.submit(2, source_call).result(timeout=10)
            after = log_setup.current_context()
    finally:
        services(app).redis.close()
    assert seen == {"lookup_id": "L-3", "source": "opencnpj", "task_id": "T-3"}
    assert after == {"lookup_id": "L-3", "task_id": "T-3"}
    (line,) = _json_lines(stream.getvalue())
    assert (line["lookup_id"], line["source"], line["task_id"]) == ("L-3", "opencnpj", "T-3")


def test_task_signals_bind_the_task_and_its_lookup_and_source_arguments():
    log_setup.bind_task(task_id="T-4", task=job_queue.fetch_source, args=["L-4", "receitaws", "cnpj", "1", 5])
    during = log_setup.current_context()
    log_setup.unbind_task(task_id="T-4")
    log_setup.bind_task(task_id="T-5", task=job_queue.finalize_lookup, args=[], kwargs={"lookup_id": "L-5"})
    finalize = log_setup.current_context()
    log_setup.unbind_task(task_id="T-5")
    assert during == {
        "lookup_id": "L-4",
        "source": "receitaws",
        "task_id": "T-4",
        "task_name": "job_queue.fetch_source",
    }
    assert finalize == {"lookup_id": "L-5", "task_id": "T-5", "task_name": "job_queue.finalize_lookup"}
    assert log_setup.current_context() == {}


def test_a_cpf_is_masked_in_logs_and_public_identifiers_are_not():
    assert log_redaction.mask_identifier("cpf", "11144477735") == "111******35"
    assert log_redaction.mask_identifier("cnpj", "11222333000181") == "11222333000181"
    assert log_redaction.mask_identifier("cep", "01310100") == "01310100"


def _lines(stack, name: str) -> list[dict]:
    return _json_lines(stack.log(name))  # raises on any line that is not one JSON object


def test_one_lookup_is_followed_by_its_id_across_the_web_and_worker_json_logs(make_stack, sandbox):
    stack = make_stack(LOG_FORMAT="json", **FAST_LIMITS)
    stack.start_worker()
    stack.start_web()
    created = stack.post_lookup(sandbox.identifiers("cnpj", 1, seed=4242)[0], refresh=True).json()
    lookup_id = created["id"]
    stack.wait_status(lookup_id)
    cpf = stack.post_lookup("111.444.777-35", refresh=True)
    assert cpf.status_code == 200  # answered from the number alone (cpf_answers.py)
    for token in ("wrong-token", STACK_TOKEN):
        headers = {"Authorization": f"Bearer {token}"}
        requests.get(f"{stack.web_url}/api/admin/dead-letters", headers=headers, timeout=10)

    def finalized() -> list[dict]:  # the record says complete a moment before the line is written
        lines = _lines(stack, "w1")
        done = {line.get("lookup_id") for line in lines if line.get("status") == "complete"}
        return lines if lookup_id in done else []

    worker = wait_for(finalized, timeout=10, message="the worker's finalize lines")
    web = _lines(stack, "web")
    assert {line["process"] for line in web} == {"web"} and {line["process"] for line in worker} == {"worker"}
    (started,) = [line for line in web if line.get("lookup_id") == lookup_id]
    assert started["outcome"] == "started" and started["level"] == "INFO"
    mine = [line for line in worker if line.get("lookup_id") == lookup_id]
    for source, task_id in created["tasks"].items():
        calls = [line for line in mine if line.get("source") == source and "state" in line]
        assert calls and {line["task_id"] for line in calls} == {task_id}, (source, mine)
        assert calls[-1]["state"] == "ok" and calls[-1]["elapsed_ms"] > 0
    assert [line["status"] for line in mine if "status" in line] == ["complete"]
    assert all(line.get("task_name") for line in mine)
    for name in ("web", "w1"):
        text = stack.log(name)
        assert STACK_TOKEN not in text
        assert "11144477735" not in text and "111.444.777" not in text  # never a whole CPF

    # Celery's signal handlers print a notice of their own to stdout, outside logging (stderr,
    # where the log goes, stays pure JSON): the only other line a stopped worker leaves.
    stack.kill("w1", signal.SIGTERM)
    lines = [line for line in stack.log("w1").splitlines() if line.strip()]
    others = [line for line in lines if not line.startswith("{")]
    assert others == ["worker: Warm shutdown (MainProcess)"]
    assert all(json.loads(line)["process"] == "worker" for line in lines if line not in others)


def test_beat_logs_json_lines_as_beat(make_stack):
    stack = make_stack(LOG_FORMAT="json")
    stack.start_beat()
    lines = wait_for(
        lambda: [line for line in _lines(stack, "beat") if line["message"].startswith("beat: Starting")],
        timeout=20,
        message="beat's start line",
    )
    assert {line["process"] for line in _lines(stack, "beat")} == {"beat"}
    assert lines[0]["logger"] == "celery.beat"


def test_log_settings_are_checked_and_the_celery_command_lines_follow_them():
    assert Settings.from_env({"LOG_LEVEL": "warning"}).log_level == "WARNING"
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        Settings.from_env({"LOG_LEVEL": "chatty"})
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        Settings.from_env({"LOG_FORMAT": "xml"})
    production = launcher.commands(Settings.from_env({"PROFILE": "high-load"}))
    development = launcher.commands(Settings.from_env({}))
    for name in ("worker", "beat"):
        line = production[name]
        assert line[line.index("--loglevel") + 1] == "WARNING" and line[1] == "--quiet"
        assert "--quiet" not in development[name]
        assert development[name][development[name].index("--loglevel") + 1] == "INFO"


def test_a_redacted_access_line_keeps_its_http_object_with_the_values_redacted(capture):
    logger, stream = capture("json", "web")
    access = logging.getLogger("gunicorn.access")
    atoms = {"m": "GET", "U": "/lookups/111.444.777-35", "s": "200", "D": "1200", "B": "5", "h": "127.0.0.1"}
    record = access.makeRecord(
        "gunicorn.access", logging.INFO, __file__, 1, "%(m)s %(U)s 100%% %(s)s", atoms, None
    )
    logger.handle(record)
    (line,) = _json_lines(stream.getvalue())
    # the pid and time are the process's own figures and may contain any digits
    logged = {key: value for key, value in line.items() if key not in ("pid", "time")}
    assert "444" not in json.dumps(logged) and "777" not in json.dumps(logged)
    assert line["message"] == "GET /lookups/111.***.***-35 100% 200"
    assert line["http"] == {
        "method": "GET",
        "path": "/lookups/111.***.***-35",
        "status": "200",
        "duration_us": "1200",
        "bytes": "5",
        "remote": "127.0.0.1",
    }
