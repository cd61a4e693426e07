"""`make run`'s launcher: embedded Redis, sandbox, web, worker and beat come up; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
import requests
from conftest import ROOT, wait_for
from prometheus_client.parser import text_string_to_metric_families

from devstack.embedded_redis import free_port


def _samples(url: str) -> dict:
    text = requests.get(url, timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_launcher_runs_every_process_and_sigterm_stops_them_all(tmp_path):
    port, sandbox_port, redis_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env.update(
        PORT=str(port),
        SANDBOX_PORT=str(sandbox_port),
        EMBEDDED_REDIS_PORT=str(redis_port),
        DATA_DIR=str(tmp_path / "var"),
        KEY_PREFIX="launcher",
        WORKER_METRICS_PORT=str(metrics_port),
    )
    log = (tmp_path / "launcher.log").open("wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "devstack.launcher"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:

        def ready():
            try:
                return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json().get("ready")
            except (requests.RequestException, ValueError):
                return False

        wait_for(ready, timeout=60, interval=0.2, message="the launched service to be ready")
        created = requests.post(
            f"http://127.0.0.1:{port}/api/lookups", json={"identifier": "01310-100"}, timeout=5
        ).json()
        wait_for(
            lambda: (
                requests.get(f"http://127.0.0.1:{port}{created['links']['self']}", timeout=5).json()["status"]
                == "complete"
            ),
            timeout=20,
            message="a lookup through the launched stack",
        )
        assert (tmp_path / "var" / "redis" / "appendonlydir").exists()  # AOF under DATA_DIR
        # The web app's gunicorn runs with gunicorn_config.py: its workers share DATA_DIR/metrics.
        assert list((tmp_path / "var" / "metrics").glob("*.db"))
        web = _samples(f"http://127.0.0.1:{port}/metrics")
        assert web[("enrich_cache_reads_total", (("result", "miss"), ("type", "cep")))] == 2  # its 2 sources
        assert web[("enrich_redis_up", ())] == 1
        worker = _samples(f"http://127.0.0.1:{metrics_port}/metrics")  # the worker's own port
        assert worker[("enrich_lookups_total", (("outcome", "complete"), ("type", "cep")))] == 1
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 5  # valkey, sandbox, web, worker, beat (and their workers)
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(60)
    assert launcher.returncode == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.pid for p in alive]


def _child(launcher: subprocess.Popen, wanted: str) -> psutil.Process:
    """The launcher's direct child whose command line names `wanted` (valkey-server, the worker, ...)."""
    for child in psutil.Process(launcher.pid).children():
        if wanted in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no child running {wanted}")


@pytest.mark.slow
@pytest.mark.parametrize(("killed", "named"), [("valkey-server", "redis"), ("job_queue worker", "worker")])
def test_a_child_that_dies_unasked_stops_everything_and_make_run_fails(tmp_path, killed, named):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env.update(
        PORT=str(port),
        SANDBOX_PORT=str(free_port()),
        EMBEDDED_REDIS_PORT=str(free_port()),
        DATA_DIR=str(tmp_path / "var"),
        KEY_PREFIX="launcher",
        WORKER_METRICS_PORT="0",
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "devstack.launcher"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: len(psutil.Process(launcher.pid).children()) >= 5, 60, 0.2, "every child")
        children = psutil.Process(launcher.pid).children(recursive=True)
        _child(launcher, killed).kill()  # SIGKILL: a crash, not a stop

        output = launcher.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 1, output[-2000:]
    assert f"{named} exited unasked with signal SIGKILL; stopping everything" in output
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]  # nothing left running, no zombie Redis
