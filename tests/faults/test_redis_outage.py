"""Redis stopped for 10 s under load: fast 503s, not ready, then every process reconnects and nothing is lost."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from conftest import FAST_LIMITS, wait_for

from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich.services import services

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 10


class Load(threading.Thread):
    """Posts a lookup every 100 ms and records what the API answered and how fast."""

    def __init__(self, url: str, identifiers: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.identifiers = url, identifiers
        self.answers: list[tuple[float, float, int, dict | None]] = []  # (at, seconds, status, body)
        self.stopping = threading.Event()

    def run(self) -> None:
        for identifier in self.identifiers:
            if self.stopping.is_set():
                return
            started = time.monotonic()
            try:
                response = requests.post(
                    f"{self.url}/api/lookups", json={"identifier": identifier, "refresh": True}, timeout=5
                )
                status, body = response.status_code, response.json()
            except (requests.RequestException, ValueError) as error:
                status, body = 0, {"exception": repr(error)}
            self.answers.append((started, time.monotonic() - started, status, body))
            self.stopping.wait(0.1)


@pytest.fixture
def redis_server(tmp_path):
    server = EmbeddedRedis(free_port(), tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


def test_redis_stopped_for_ten_seconds_under_load(redis_server, sandbox_url, sandbox, tmp_path):
    from stack import Stack

    for name in ("brasilapi", "opencnpj", "receitaws"):
        sandbox.control(name, latency_ms=300, quota_per_minute=None)  # work queues up behind a slow upstream
    stack = Stack(
        redis_server.url,
        sandbox_url,
        tmp_path / "stack",
        **FAST_LIMITS,
        HEALTH_CHECK_INTERVAL="2",
        WORKER_HEARTBEAT_TTL="5",
        LOOKUP_DEADLINE="60",
        VISIBILITY_TIMEOUT="10",
    )  # tasks running at the outage come back after it
    (tmp_path / "stack").mkdir()
    try:
        stack.start_worker("w1", concurrency=16)
        stack.start_beat()
        stack.start_web()
        wait_for(
            lambda: stack.get("/readyz").status_code == 200, timeout=30, message="ready before the outage"
        )
        load = Load(stack.web_url, sandbox.identifiers("cnpj", 2000, seed=7000))
        load.start()
        wait_for(lambda: len(load.answers) >= 40, timeout=30, message="load before the outage")

        redis_server.stop()
        stopped_at = time.monotonic()
        during = []
        while time.monotonic() - stopped_at < OUTAGE_SECONDS:
            for path in ("/api/lookups/some-id", "/readyz", "/api/status"):
                started = time.monotonic()
                response = requests.get(stack.web_url + path, timeout=5)
                during.append((path, time.monotonic() - started, response.status_code, response.json()))
            time.sleep(0.2)  # pacing the probes, not waiting for a condition
        redis_server.start()
        restarted_at = time.monotonic()

        outage_posts = [a for a in load.answers if stopped_at + 0.5 < a[0] < restarted_at - 0.5]
        assert outage_posts, "no lookup was posted during the outage"
        for _, seconds, status, body in outage_posts:
            assert status == 503 and body["error"] == "unavailable", body
            assert seconds < 1.0, f"a POST took {seconds:.2f} s during the outage"
        for path, seconds, status, body in during[3:]:
            assert status == 503 and seconds < 1.0, (path, seconds, status, body)
            if path == "/readyz":
                assert body["ready"] is False and body["redis"] is False
            else:
                assert body["error"] == "unavailable" and "Traceback" not in str(body)

        # Every process reconnects by itself: a fresh worker heartbeat, a fresh health check by beat.
        wait_for(lambda: stack.get("/readyz").status_code == 200, timeout=30, message="ready again")
        restarted_wall = time.time() - (time.monotonic() - restarted_at)
        wait_for(
            lambda: (
                (stack.get("/api/status").json().get("health_check") or {}).get("checked_at", 0)
                > restarted_wall + 0.5
            ),
            timeout=30,
            message="beat's health check to run after the restart",
        )
        load.stopping.set()
        load.join(10)

        accepted = [body["id"] for _, _, status, body in load.answers if status in (200, 202)]
        assert len(accepted) >= 40
        store = services(stack.app).lookups

        def unfinished() -> list[str]:
            return [i for i in accepted if (lookup := store.get(i)) is None or lookup.status != "complete"]

        wait_for(
            lambda: not unfinished(),
            timeout=90,
            interval=0.5,
            message="every accepted lookup to complete after the restart",
        )
        # A worker that stalled after the restart (celery/celery#9054) would not run new work.
        fresh = stack.post_lookup(sandbox.known("cnpj", seed=7999), refresh=True).json()
        stack.wait_status(fresh["id"], timeout=20)
        for name in ("w1", "beat", "web"):
            assert stack.processes[name][0].poll() is None, f"{name} died:\n{stack.log(name)[-2000:]}"
        slowest = max(seconds for _, seconds, _, _ in outage_posts)
        print(
            f"\nRedis down {OUTAGE_SECONDS} s: {len(outage_posts)} POSTs answered 503 (slowest {slowest * 1000:.0f} ms); "
            f"{len(accepted)} accepted lookups all complete {time.monotonic() - restarted_at:.1f} s after the restart"
        )
    finally:
        stack.stop()
