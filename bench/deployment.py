"""The service as the benchmarks run it: embedded Valkey, the sandbox, a Celery worker and gunicorn.

Every process is the project's own command (tests/stack.py starts them, as the end-to-end tests
do), in its own session, stopped on exit; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from stack import Stack, _wait  # noqa: E402

from embedded_redis import EmbeddedRedis, free_port  # noqa: E402

BIN = Path(sys.executable).parent
SOURCES = ("BRASILAPI", "RECEITAWS", "OPENCNPJ", "VIACEP")
NO_LIMITS = {f"RATE_LIMIT_{name}": "60000" for name in SOURCES}
NO_QUOTAS = {f"SANDBOX_QUOTA_{name}": "none" for name in SOURCES}


def spawn(name: str, command: list[str], env: dict, tmp: Path) -> subprocess.Popen:
    log = (tmp / f"{name}.log").open("wb")
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def healthy(url: str, process: subprocess.Popen, name: str) -> None:
    import requests

    def answers() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    _wait(answers, 30, name, process)


@contextlib.contextmanager
def deployment(tmp: Path, sandbox_latency_ms: int = 0, worker: bool = True) -> Iterator[Stack]:
    """Valkey, the sandbox (quotas off, fixed latency), a Celery worker and the web server (limits off)."""
    redis = EmbeddedRedis(free_port(), tmp / "redis", appendonly=False)
    redis.start()
    sandbox_port = free_port()
    sandbox = spawn(
        "sandbox",
        [
            str(BIN / "gunicorn"),
            "-k",
            "gevent",
            "-w",
            "1",
            "--no-control-socket",
            "-b",
            f"127.0.0.1:{sandbox_port}",
            "--log-level",
            "warning",
            "sandbox:create_app()",
        ],
        {**os.environ, **NO_QUOTAS, "SANDBOX_LATENCY_MS": str(sandbox_latency_ms)},
        tmp,
    )
    (tmp / "stack").mkdir()
    stack = Stack(redis.url, f"http://127.0.0.1:{sandbox_port}", tmp / "stack", **NO_LIMITS)
    try:
        healthy(f"http://127.0.0.1:{sandbox_port}/healthz", sandbox, "the sandbox")
        if worker:
            stack.start_worker("w1", concurrency=16)
        stack.start_web()
        yield stack
    finally:
        stack.stop()
        sandbox.terminate()
        sandbox.wait(10)
        redis.stop()


@contextlib.contextmanager
def serial_baseline(stack: Stack, tmp: Path) -> Iterator[str]:
    """The seeds' serial endpoint on gunicorn's default sync workers, 2 x cores + 1; yields its URL."""
    port = free_port()
    workers = 2 * (os.cpu_count() or 1) + 1
    process = spawn(
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
            "bench.baselines.serial_app:create_app()",
        ],
        {**stack.env, "PYTHONPATH": str(ROOT)},
        tmp,
    )
    try:
        healthy(f"http://127.0.0.1:{port}/api/lookups", process, "the serial baseline")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(15)
