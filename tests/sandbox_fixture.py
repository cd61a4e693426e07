"""Pytest fixtures that run the sandbox upstream under gunicorn (gevent, one worker) for real-HTTP tests.

Load it as a plugin (`pytest_plugins = ["sandbox_fixture"]`) rather than importing names from it, so
pytest rewrites its asserts and every test module shares one sandbox server.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.embedded_redis import free_port
from devstack.sandbox import is_known
from enrich.identifiers import cnpj_check_digits, cpf_check_digits

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"sandbox exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer in time
            pass
        time.sleep(0.05)
    raise RuntimeError(
        f"sandbox not healthy within {START_TIMEOUT}s:\n{log.read_text(errors='replace')[-3000:]}"
    )


@pytest.fixture(scope="session")
def sandbox_url(tmp_path_factory) -> Iterator[str]:
    """Base URL of a sandbox upstream served by gunicorn on a free port for the whole session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("sandbox") / "gunicorn.log"
    # Faults start from the code's defaults, whatever the developer's shell exports.
    environ = {key: value for key, value in os.environ.items() if not key.startswith("SANDBOX_")}
    command = [
        sys.executable, "-m", "gunicorn", "-k", "devstack.sandbox_worker.StampingGeventWorker", "-w", "1",
        "-b", f"127.0.0.1:{port}",
        "--graceful-timeout", "2", "--no-control-socket", "devstack.sandbox:create_app()",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def generated_cnpjs(count: int, seed: int = 1, alphanumeric: bool = False) -> list[str]:
    """`count` valid, distinct, reproducible CNPJs (numeric unless `alphanumeric`)."""
    generator = random.Random(seed)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ" if alphanumeric else "0123456789"
    values: dict[str, None] = {}
    while len(values) < count:
        base = "".join(generator.choice(alphabet) for _ in range(8)) + "0001"
        values[base + cnpj_check_digits(base)] = None
    return list(values)


def generated_cpfs(count: int, seed: int = 1) -> list[str]:
    """`count` valid, distinct, reproducible CPFs."""
    generator = random.Random(seed)
    values: dict[str, None] = {}
    while len(values) < count:
        base = f"{generator.randrange(1, 10**9):09d}"
        values[base + cpf_check_digits(base)] = None
    return list(values)


def generated_ceps(count: int, seed: int = 1) -> list[str]:
    """`count` distinct, reproducible CEPs."""
    generator = random.Random(seed)
    return [f"{value:08d}" for value in generator.sample(range(1_000_000, 99_999_999), count)]


GENERATORS: dict[str, Callable[[int, int], list[str]]] = {
    "cnpj": generated_cnpjs,
    "cep": generated_ceps,
    "cpf": generated_cpfs,
}


class SandboxClient:
    """A test's handle on the sandbox: its URL, fault control and request counts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def control(self, upstream: str, **fields: Any) -> dict[str, Any]:
        """Set fault fields of one upstream (latency_ms, jitter_ms, error_rate, outage, quota_per_minute)."""
        response = self.session.post(f"{self.url}/_control", json={"upstream": upstream, **fields}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def reset(self) -> None:
        """Zero the counts and put every fault back to its default."""
        response = self.session.post(f"{self.url}/_control", json={"reset": True}, timeout=5)
        assert response.status_code == 200, response.text

    def stats(self) -> dict[str, Any]:
        """GET /_stats."""
        response = self.session.get(f"{self.url}/_stats", timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def arrivals(self, upstream: str) -> list[float]:
        """When each request of `upstream` (or `_probe`) reached the sandbox since the last reset,
        by the kernel's stamps, oldest first."""
        response = self.session.get(f"{self.url}/_arrivals/{upstream}", timeout=5)
        assert response.status_code == 200, response.text
        assert response.json()["kernel_stamped"] == len(response.json()["requests"])
        return sorted(arrived for arrived, _, _ in response.json()["requests"])

    def served(self, upstream: str) -> int:
        """How many requests this upstream has served since the last reset."""
        return self.stats()["upstreams"][upstream]["requests"]

    def identifiers(self, kind: str, count: int, seed: int = 1) -> list[str]:
        """`count` valid, distinct, reproducible identifiers of `kind` ("cnpj", "cep" or "cpf")."""
        return GENERATORS[kind](count, seed)

    def known(self, kind: str, seed: int = 1) -> str:
        """A generated identifier of `kind` that the sandbox finds."""
        return next(value for value in self.identifiers(kind, 100, seed) if is_known(value))

    def unknown(self, kind: str, seed: int = 1) -> str:
        """A generated valid identifier of `kind` that the sandbox answers "not found" for."""
        return next(value for value in self.identifiers(kind, 100, seed) if not is_known(value))

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET a path of the sandbox (e.g. "/viacep/ws/01310100/json/")."""
        kwargs.setdefault("timeout", 10)
        return self.session.get(f"{self.url}{path}", **kwargs)


@pytest.fixture
def sandbox(sandbox_url) -> Iterator[SandboxClient]:
    """The session's sandbox, reset to default faults and zero counts before the test."""
    client = SandboxClient(sandbox_url)
    client.reset()
    yield client
    client.session.close()
