"""`make run`: Redis (embedded unless REDIS_URL is set), sandbox, gunicorn, Celery worker and beat.

Runs every process in the foreground; Ctrl-C or SIGTERM stops them all and exits 0.  A child
that dies unasked, the embedded Redis included, stops the rest too (a broken setup is never half
running) and `make run` exits 1, naming it and its exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devstack.embedded_redis import EmbeddedRedis
from enrich.settings import Settings

ROOT = Path(__file__).resolve().parent.parent  # the project directory
BIN = Path(sys.executable).parent


def commands(settings: Settings) -> dict[str, list[str]]:
    """The command line of each child process."""
    gunicorn = str(BIN / "gunicorn")
    celery = str(BIN / "celery")
    # Celery prints its startup banner to stdout, outside logging: in JSON mode every line is JSON.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    return {
        "sandbox": [
            gunicorn,
            "-k",
            "devstack.sandbox_worker.StampingGeventWorker",  # gevent's, counting kernel arrival stamps
            "--no-control-socket",
            "-w",
            "1",
            "-b",
            f"{settings.sandbox_host}:{settings.sandbox_port}",
            "--access-logfile",
            "-",
            "--log-level",
            "warning",
            "devstack.sandbox:create_app()",
        ],
        "web": [
            gunicorn,
            "-c",
            str(ROOT / "gunicorn_config.py"),  # one /metrics for all workers (multiprocess mode)
            "-k",
            "gevent",
            "--no-control-socket",
            "-w",
            str(settings.web_workers),
            "-b",
            f"{settings.host}:{settings.port}",
            "--worker-connections",
            "10000",
            "--graceful-timeout",
            "20",
            "app:create_app()",
        ],
        "worker": [
            celery,
            *quiet,
            "-A",
            "job_queue",
            "worker",
            "--loglevel",
            settings.log_level,
            "-P",
            "threads",
            "-c",
            str(settings.worker_concurrency),
            "-n",
            "worker@%h",
        ],
        "beat": [
            celery,
            *quiet,
            "-A",
            "job_queue",
            "beat",
            "--loglevel",
            settings.log_level,
            "-s",
            str(Path(settings.data_dir) / "celerybeat-schedule"),
        ],
    }


def main() -> int:
    settings = Settings.from_env()
    # gunicorn_config.py sets it for the web app's processes only; a worker or beat must never
    # write its metrics into the web app's directory.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    redis_server = None
    if not settings.redis_url:
        redis_server = EmbeddedRedis(settings.embedded_redis_port, Path(settings.data_dir) / "redis")
        print(
            f"starting embedded Valkey on 127.0.0.1:{settings.embedded_redis_port} (AOF in {redis_server.data_dir})",
            flush=True,
        )
        redis_server.start()
        env["REDIS_URL"] = redis_server.url
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)

    children: dict[str, subprocess.Popen] = {}
    if redis_server is not None and redis_server.process is not None:
        children["redis"] = redis_server.process  # watched like the others; stopped last, below
    stopping = False
    failed = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for name, command in commands(settings).items():
            children[name] = subprocess.Popen(command, cwd=ROOT, env=env)
        print(f"web on http://{settings.host}:{settings.port}  sandbox on {settings.sandbox_url}", flush=True)
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None and not stopping:
                    print(
                        f"{name} exited unasked with {_status(child.returncode)}; stopping everything",
                        flush=True,
                    )
                    stopping = failed = True
            time.sleep(0.2)
    finally:
        services = [child for name, child in children.items() if name != "redis"]
        for child in reversed(services):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 25
        for child in services:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if redis_server is not None:
            redis_server.stop()
        print("stopped", flush=True)
    return 1 if failed else 0


def _status(returncode: int) -> str:
    """`exit code 3`, or `signal SIGKILL` for a child a signal ended."""
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


if __name__ == "__main__":
    sys.exit(main())
