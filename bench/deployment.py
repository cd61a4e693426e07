"""The service as the lookup benchmarks run it, and the serial baseline beside it.

Embedded Valkey on a free port; the sandbox, the web server and one Celery worker node with the
project's own command lines (launcher.commands: gunicorn gevent with WEB_WORKERS workers, the
threads pool with WORKER_CONCURRENCY threads), each in its own session (harness.Processes) and
stopped with the benchmark.  Quotas, rate limits and the per-client limit are off (the first
two kept with `real_limits`).  Also more web servers beside it with the same command line
(`start_web`: another environment, or another app), and the load generator (bench/http_load.py),
always as a separate process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.harness import BIN, NO_LIMITS, NO_QUOTAS, ROOT, Processes, answers, start_redis, wait_for
from devstack import launcher
from devstack.embedded_redis import free_port
from enrich.settings import Settings


@dataclass
class Service:
    """URLs and settings of one running deployment."""

    web_url: str
    sandbox_url: str
    env: dict
    settings: Settings

    def sandbox_calls(self) -> int:
        """Upstream requests the sandbox has served so far, all upstreams together."""
        stats = requests.get(f"{self.sandbox_url}/_stats", timeout=5).json()
        return sum(upstream["requests"] for upstream in stats["upstreams"].values())


@contextlib.contextmanager
def service(
    tmp: Path,
    processes: Processes,
    sandbox_latency_ms: float,
    worker: bool = True,
    real_limits: bool = False,
    extra_env: dict | None = None,
) -> Iterator[Service]:
    """Valkey, the sandbox at a fixed latency, the web server and (unless told not) one worker node.

    `real_limits`: the sandbox keeps its upstreams' quotas and the service its default rate limits
    (the per-client limit stays off); `extra_env` is applied last, to every process.
    """
    redis = start_redis(tmp)
    try:
        yield _start(tmp, processes, redis.url, sandbox_latency_ms, worker, real_limits, extra_env or {})
    finally:
        processes.stop_all()
        redis.stop()


def _start(
    tmp: Path,
    processes: Processes,
    redis_url: str,
    sandbox_latency_ms: float,
    worker: bool,
    real_limits: bool = False,
    extra_env: dict | None = None,
) -> Service:
    env = {
        **os.environ,
        **({} if real_limits else {**NO_QUOTAS, **NO_LIMITS}),
        "REDIS_URL": redis_url,
        "KEY_PREFIX": f"b{uuid.uuid4().hex[:8]}",
        "DATA_DIR": str(tmp),
        "PORT": str(free_port()),
        "SANDBOX_PORT": str(free_port()),
        "SANDBOX_LATENCY_MS": str(sandbox_latency_ms),
        "LOOKUP_RATE_LIMIT": "off",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    settings = Settings.from_env(env)
    commands = launcher.commands(settings)
    # The sandbox's access log would cost it CPU on the two shared cores; nothing else changes.
    sandbox_command = [part for part in commands["sandbox"] if part not in ("--access-logfile", "-")]
    processes.spawn("sandbox", sandbox_command, env)
    wait_for(
        lambda: answers(f"{settings.sandbox_url}/healthz"),
        30,
        "the sandbox",
        processes.children["sandbox"],
        lambda: processes.log_tail("sandbox"),
    )
    if worker:
        command = commands["worker"]
        # A line per task and per source call would cost CPU too (LOG_LEVEL: log_setup keeps the
        # more verbose of it and --loglevel).
        command[command.index("--loglevel") + 1] = "WARNING"
        processes.spawn("worker", command, {**env, "LOG_LEVEL": "WARNING"})
    processes.spawn("web", commands["web"], env)
    web_url = f"http://{settings.host}:{settings.port}"
    ready = f"{web_url}/readyz" if worker else f"{web_url}/healthz"
    wait_for(
        lambda: answers(ready),
        60,
        "the web server",
        processes.children["web"],
        lambda: processes.log_tail("web"),
    )
    return Service(web_url, settings.sandbox_url, env, settings)


def start_web(
    processes: Processes, service: Service, name: str, *, env: dict | None = None, app: str | None = None
) -> Service:
    """One more web server beside the service's, on the same Redis: the launcher's web command.

    Same gunicorn options and workers, on a free port; `env` is applied over the service's
    environment (a value of None removes the variable, so that its default applies); `app`, a
    gunicorn app spec (e.g. "bench.baselines.floor_app:create_app()"), is served instead of the
    service.  It gets a METRICS_DIR of its own: gunicorn_config.py empties that directory when
    gunicorn starts, which would drop the service's metrics files.  Ready when /healthz answers.
    """
    merged = {**service.env, "PORT": str(free_port()), "METRICS_DIR": str(processes.tmp / f"metrics-{name}")}
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    settings = Settings.from_env(merged)
    command = launcher.commands(settings)["web"]
    if app is not None:
        command[command.index("app:create_app()")] = app
    process = processes.spawn(name, command, merged)
    url = f"http://{settings.host}:{settings.port}"
    wait_for(lambda: answers(f"{url}/healthz"), 60, name, process, lambda: processes.log_tail(name))
    return Service(url, service.sandbox_url, merged, settings)


def start_serial_baseline(processes: Processes, service: Service) -> str:
    """The seeds' serial endpoint on gunicorn's default sync workers, 2 x cores + 1; returns its URL."""
    port = free_port()
    workers = 2 * (os.cpu_count() or 1) + 1
    process = processes.spawn(
        "serial",
        [
            str(BIN / "gunicorn"),
            "-w",
            str(workers),
            "--no-control-socket",
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "bench.baselines.serial_app:create_app()",  # imported from the working directory, ROOT
        ],
        service.env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: answers(f"{url}/healthz"),
        60,
        "the serial baseline",
        process,
        lambda: processes.log_tail("serial"),
    )
    return url


def http_load(url: str, tmp: Path, *, bodies: list[dict] | None = None, **options) -> dict:
    """Run bench/http_load.py as its own process (`python -m bench.http_load`); returns its JSON summary.

    `bodies`: one JSON body per request, each sent once; other keyword options become flags
    (`connections=32, seconds=5, rate=400, method="POST", body="{...}", follow="sse"`).
    """
    command = [sys.executable, "-m", "bench.http_load", url]
    if bodies is not None:
        path = tmp / f"bodies-{uuid.uuid4().hex[:8]}.jsonl"
        path.write_text("".join(json.dumps(body) + "\n" for body in bodies))
        command += ["--bodies", str(path)]
    for name, value in options.items():
        if value is True:
            command.append(f"--{name}")
        elif value is not None and value is not False:
            command += [f"--{name}", str(value)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if finished.returncode != 0:
        raise RuntimeError(f"http_load failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout)
