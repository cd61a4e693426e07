"""Real processes for end-to-end tests: Celery workers, beat and gunicorn, on the test Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests

from devstack.embedded_redis import free_port
from enrich.services import services
from enrich.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _wait(
    condition, timeout: float, message: str, process: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{message}: process exited with {process.returncode}\n{tail}")
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {message}\n{tail}")


class Stack:
    """One service deployment under its own key prefix: env, child processes, helpers."""

    def __init__(self, redis_url: str, sandbox_url: str, tmp: Path, **env: str) -> None:
        host, port = sandbox_url.rsplit("//", 1)[1].split(":")
        self.tmp = tmp
        self.env = {
            # gunicorn_config.py sets it for the web processes alone (as in production)
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            "REDIS_URL": redis_url,
            "KEY_PREFIX": f"s{uuid.uuid4().hex[:10]}",
            "SANDBOX_HOST": host,
            "SANDBOX_PORT": port,
            "DATA_DIR": str(tmp),
            "ADMIN_TOKEN": "test-admin-token",
            "PYTHONUNBUFFERED": "1",
            "LOOKUP_RATE_LIMIT": "off",  # the per-client limits have their own tests
            "BATCH_RATE_LIMIT": "off",
            "WORKER_METRICS_PORT": "0",  # many workers at once: a test that wants metrics names a port
            **{k: str(v) for k, v in env.items()},
        }
        self.settings = Settings.from_env(self.env)
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.web_url: str | None = None
        self._app = None

    @property
    def app(self):
        """An in-process Flask app on the same settings, for reading state directly."""
        if self._app is None:
            from app import create_app

            self._app = create_app(self.settings)
        return self._app

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = (process, log)
        return process

    def _celery_quiet(self) -> list[str]:
        # As the launcher: no startup banner (printed outside logging) when every line is JSON.
        return ["--quiet"] if self.settings.log_format == "json" else []

    def start_worker(self, name: str = "w1", concurrency: int = 8) -> subprocess.Popen:
        """A Celery worker node; returns once it reports its heartbeat."""
        hostname = f"{name}@{self.env['KEY_PREFIX']}"
        process = self._spawn(
            name,
            [
                str(BIN / "celery"),
                *self._celery_quiet(),
                "-A",
                "job_queue",
                "worker",
                "-P",
                "threads",
                "-c",
                str(concurrency),
                "-n",
                hostname,
                "--loglevel",
                os.environ.get("TEST_WORKER_LOGLEVEL", "INFO"),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
        )
        client = services(self.app).redis
        key = f"{self.settings.key_prefix}:workers"
        _wait(
            lambda: client.zscore(key, hostname) is not None,
            30,
            f"worker {name}",
            process,
            self.processes[name][1],
        )
        return process

    def start_beat(self) -> subprocess.Popen:
        return self._spawn(
            "beat",
            [
                str(BIN / "celery"),
                *self._celery_quiet(),
                "-A",
                "job_queue",
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(self.tmp / "celerybeat-schedule"),
            ],
        )

    def start_web(self, port: int | None = None, workers: int = 1) -> str:
        """gunicorn with gevent workers (one unless told) serving app:create_app(); returns its base URL."""
        port = port or free_port()
        process = self._spawn(
            "web",
            [
                str(BIN / "gunicorn"),
                "-c",
                str(ROOT / "gunicorn_config.py"),
                "-k",
                "gevent",
                "--no-control-socket",
                "-w",
                str(workers),
                "-b",
                f"127.0.0.1:{port}",
                "--worker-connections",
                "10000",
                "--log-level",
                "warning",
                "app:create_app()",
            ],
        )
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return requests.get(f"{url}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        _wait(healthy, 30, "gunicorn web", process, self.processes["web"][1])
        self.web_url = url
        return url

    def log(self, name: str) -> str:
        return self.processes[name][1].read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a child's whole process group (a worker node with its pool)."""
        process, _ = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, sig)
            process.wait(15)

    def stop(self) -> None:
        for process, _ in list(self.processes.values()):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in list(self.processes.values()):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._app is not None:
            services(self._app).redis.close()

    # -- HTTP helpers --------------------------------------------------------------------

    def post_lookup(self, identifier: str, **fields) -> requests.Response:
        return requests.post(
            f"{self.web_url}/api/lookups", json={"identifier": identifier, **fields}, timeout=10
        )

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(f"{self.web_url}{path}", timeout=10, **kwargs)

    def wait_status(self, lookup_id: str, statuses=("complete",), timeout: float = 20.0) -> dict:
        """Poll the lookup until its status is one of `statuses`; returns it."""

        def done():
            body = self.get(f"/api/lookups/{lookup_id}").json()
            return body if body["status"] in statuses else None

        return _wait(done, timeout, f"lookup {lookup_id} to reach {statuses}")


@contextlib.contextmanager
def started(redis_url: str, sandbox_url: str, tmp: Path, **env: str) -> Iterator[Stack]:
    """A stack with one worker and one web process running; everything stopped at the end."""
    stack = Stack(redis_url, sandbox_url, tmp, **env)
    try:
        stack.start_worker()
        stack.start_web()
        yield stack
    finally:
        stack.stop()
