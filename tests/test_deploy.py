"""deploy/ stays true: the Procfile's and the systemd units' commands start a working service, as launcher.py does."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import requests
from conftest import wait_for
from deploy_files import BIN, DEPLOY, ENV_FILE, ROOT, Host, Unit, env_file, options, procfile

from devstack import launcher
from devstack.embedded_redis import free_port
from enrich.celery_setup import LookupCelery
from enrich.settings import PROFILES, SOURCE_NAMES, Settings

UNITS = ("enrich-web.service", "enrich-worker@.service", "enrich-beat.service")
PER_SOURCE = ("RATE_LIMIT_", "RATE_BURST_", "TIMEOUT_", "BREAKER_FAIL_MAX_", "BREAKER_RESET_TIMEOUT_")
PER_SOURCE += ("BREAKER_SUCCESS_THRESHOLD_",)
SOURCE_VARIABLES = {prefix + name.upper() for prefix in PER_SOURCE for name in SOURCE_NAMES}
SOURCE_VARIABLES |= {f"{name.upper()}_BASE_URL" for name in SOURCE_NAMES}


def operator_edits(redis_url: str, sandbox_url: str, state: Path) -> dict[str, str]:
    """What an operator writes into enrich.env, pointed at the test's Redis and sandbox."""
    host, port = sandbox_url.rsplit("//", 1)[1].split(":")
    return {
        "REDIS_URL": redis_url,
        "KEY_PREFIX": f"d{uuid.uuid4().hex[:10]}",
        "ADMIN_TOKEN": "deploy-test-token",
        "SOURCES_MODE": "sandbox",
        "SANDBOX_HOST": host,
        "SANDBOX_PORT": port,
        "DATA_DIR": str(state / "enrich"),
        "PORT": str(free_port()),
        "WEB_WORKERS": "1",  # 2 cores for the whole suite
        "WORKER_CONCURRENCY": "4",
        "LOOKUP_RATE_LIMIT": "off",
    }


class Service:
    """The processes of one deployment, started from deploy/ files, each stopped as its manager would."""

    def __init__(self, tmp: Path, edits: dict[str, str]) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        (self.state / "enrich").mkdir(parents=True)  # StateDirectory=enrich
        self.env_path = tmp / "enrich.env"
        example = (DEPLOY / "enrich.env.example").read_text()
        self.env_path.write_text(example + "".join(f"{k}={v}\n" for k, v in edits.items()))
        self.settings = Settings.from_env(env_file(self.env_path))
        # What systemd passes besides the unit's own variables: no venv, no PYTHONPATH.
        self.base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(tmp)}
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.processes: dict[str, tuple[subprocess.Popen, signal.Signals, float]] = {}

    def spawn(self, name: str, command: list[str], env: dict[str, str], cwd: str, stop: tuple) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = (process, *stop)

    def start_unit(self, unit: Unit, instance: str = "", extra_env: dict[str, str] | None = None) -> str:
        host = Host(self.state, {ENV_FILE: self.env_path}, instance)
        env = host.environment(unit, {**self.base, **(extra_env or {})})
        name = unit.name.replace("@", f"@{instance}")
        stop = (signal.Signals[unit.value("KillSignal")], float(unit.value("TimeoutStopSec")))
        self.spawn(name, host.exec_start(unit, env), env, host.path(unit.value("WorkingDirectory")), stop)
        return name

    def start_procfile_line(self, kind: str, command: str) -> None:
        # honcho and foreman run each line with the shell, the venv's bin first on PATH; `exec`
        # makes the program itself the process that gets the signal, as in a dyno.
        env = {**self.base, "PATH": f"{BIN}:{self.base['PATH']}", **env_file(self.env_path)}
        self.spawn(kind, ["/bin/sh", "-c", f"exec {command}"], env, str(ROOT), (signal.SIGTERM, 30.0))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self, name: str) -> int:
        """Signal the main process alone (KillMode=mixed); it must exit within its stop timeout."""
        process, sig, timeout = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(
                f"{name} did not stop within {timeout}s of {sig.name}\n{self.log(name)}"
            ) from None

    def stop_all(self) -> None:
        for name in list(self.processes):
            process = self.processes[name][0]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            del self.processes[name]

    def wait(self, condition, message: str, timeout: float = 60.0):
        """wait_for, with every process's log tail in the failure."""
        try:
            return wait_for(condition, timeout=timeout, interval=0.1, message=message)
        except AssertionError as error:
            logs = "".join(f"\n--- {name}\n{self.log(name)}" for name in self.processes)
            raise AssertionError(f"{error}{logs}") from None

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/readyz", timeout=2).json().get("ready") is True
        except (requests.RequestException, ValueError):
            return False

    def health_report(self, client) -> bytes | None:
        return client.get(f"{self.settings.key_prefix}:health")

    def lookup(self, identifier: str, timeout: float = 20.0) -> dict:
        created = requests.post(f"{self.url}/api/lookups", json={"identifier": identifier}, timeout=5).json()

        def done():
            body = requests.get(f"{self.url}{created['links']['self']}", timeout=5).json()
            return body if body["status"] == "complete" else None

        return self.wait(done, f"lookup {identifier} to complete", timeout=timeout)


@pytest.fixture
def service(redis_url, sandbox_url, tmp_path, redis_client):
    deployment = Service(tmp_path, operator_edits(redis_url, sandbox_url, tmp_path / "state"))
    yield deployment
    deployment.stop_all()
    for key in redis_client.scan_iter(match=f"{deployment.settings.key_prefix}:*", count=1000):
        redis_client.delete(key)


def _notify_socket() -> tuple[socket.socket, str]:
    directory = tempfile.mkdtemp(prefix="notify", dir="/tmp")  # an AF_UNIX path has at most 107 bytes
    path = os.path.join(directory, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(30)
    return receiver, path


def test_the_procfile_runs_web_worker_and_beat_and_each_stops_cleanly_on_sigterm(
    service, redis_client, sandbox
):
    lines = procfile()
    assert [kind for kind, _ in lines] == ["web", "worker", "beat"]  # one beat line: beat runs once
    for kind, command in lines:
        service.start_procfile_line(kind, command)
    service.wait(service.ready, "the Procfile's web ready", timeout=60)
    lookup = service.lookup(sandbox.known("cep"))
    assert {state["state"] for state in lookup["sources"].values()} == {"ok"}
    service.wait(lambda: service.health_report(redis_client), "beat's health check at start", timeout=30)
    for kind, _ in lines:
        assert service.stop(kind) == 0, service.log(kind)


def test_the_units_run_the_service_with_two_workers_on_one_machine(service, redis_client, sandbox):
    receiver, notify_path = _notify_socket()
    try:
        web = service.start_unit(Unit.read("enrich-web.service"), extra_env={"NOTIFY_SOCKET": notify_path})
        assert b"READY=1" in receiver.recv(4096)  # Type=notify: gunicorn's master says when it is up
    finally:
        receiver.close()
        shutil.rmtree(os.path.dirname(notify_path), ignore_errors=True)
    beat = service.start_unit(Unit.read("enrich-beat.service"))
    template = Unit.read("enrich-worker@.service")
    ports = [free_port(), free_port()]
    workers = [service.start_unit(template, instance=str(port)) for port in ports]
    hostnames = [f"worker{port}@{socket.gethostname()}" for port in ports]

    def live() -> bool:
        members = redis_client.zrange(f"{service.settings.key_prefix}:workers", 0, -1)
        return {name.encode() for name in hostnames} <= set(members)

    service.wait(live, "both worker instances")
    for port in ports:  # each instance serves its metrics on its own port, its instance name
        scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert scraped.status_code == 200 and "# TYPE" in scraped.text
    # No -c in the unit: the concurrency comes from the settings (WORKER_CONCURRENCY, else the profile).
    celery = LookupCelery(service.settings)
    try:
        stats = celery.control.inspect(destination=hostnames[:1], timeout=5).stats() or {}
    finally:
        celery.close()
    assert stats[hostnames[0]]["pool"]["max-concurrency"] == service.settings.worker_concurrency == 4
    service.wait(service.ready, "the web unit ready", timeout=30)
    assert {s["state"] for s in service.lookup(sandbox.known("cep"))["sources"].values()} == {"ok"}
    service.wait(lambda: service.health_report(redis_client), "the beat unit's health check", timeout=30)
    # beat's schedule file in the state directory (%S/enrich), where DATA_DIR points too
    assert any(path.name.startswith("celerybeat-schedule") for path in (service.state / "enrich").iterdir())
    for name in (*workers, beat, web):
        assert service.stop(name) == 0, service.log(name)


def test_the_worker_unit_finishes_its_running_task_on_its_kill_signal(service, redis_client, sandbox):
    """Celery's warm shutdown: SIGTERM mid-call, the call completes, the worker exits 0 in time."""
    service.start_unit(Unit.read("enrich-web.service"))
    worker = service.start_unit(Unit.read("enrich-worker@.service"), instance=str(free_port()))
    service.wait(service.ready, "web and worker ready", timeout=60)
    for upstream in ("brasilapi", "viacep"):
        sandbox.control(upstream, latency_ms=3000)
    cep = sandbox.known("cep", seed=7)
    created = requests.post(f"{service.url}/api/lookups", json={"identifier": cep}, timeout=5).json()

    def calling() -> bool:
        states = requests.get(f"{service.url}{created['links']['self']}", timeout=5).json()["sources"]
        return all(state["state"] == "running" for state in states.values())

    service.wait(calling, "the worker to be calling the sources", timeout=20)
    assert service.stop(worker) == 0, service.log(worker)  # waits for the 3 s calls, within TimeoutStopSec
    lookup = requests.get(f"{service.url}{created['links']['self']}", timeout=5).json()
    assert lookup["status"] == "complete"
    assert {state["state"] for state in lookup["sources"].values()} == {"ok"}
    assert sandbox.served("brasilapi") == sandbox.served("viacep") == 1  # nothing was called twice


def test_the_units_commands_use_launcher_options_with_the_same_values():
    launched = launcher.commands(Settings.from_env({}, log_format="json"))
    host = Host(Path("/var/lib"), {}, "9101")
    env = {"WEB_WORKERS": "4", "HOST": "127.0.0.1", "PORT": "8000", "DATA_DIR": "/var/lib/enrich"}
    # Left out on purpose: the settings reach the process another way (gunicorn_config.py for the
    # web's workers and address, job_queue's Celery config for the concurrency, log_setup for
    # LOG_LEVEL), so PROFILE keeps its say.
    omitted = {"web": {"-w", "-b"}, "worker": {"-c", "--loglevel"}, "beat": {"--loglevel"}}
    same_value = {"-k", "--worker-connections", "--graceful-timeout", "-A", "-P"}
    for kind, unit_name in zip(("web", "worker", "beat"), UNITS, strict=True):
        unit = Unit.read(unit_name)
        command = host.exec_start(unit, env)
        procfile_command = dict(procfile())[kind].split()
        for words in (command, procfile_command):
            named, positional = options(words)
            expected, expected_positional = options(launched[kind])
            assert Path(words[0]).name == Path(launched[kind][0]).name
            assert set(expected) - set(named) == omitted[kind] and set(named) <= set(expected), kind
            assert [w.strip("'") for w in positional] == expected_positional, kind
            for option in same_value & set(named):
                assert named[option] == expected[option], (kind, option)
            if "-c" in named and kind == "web":
                assert Path(named["-c"]).name == Path(expected["-c"]).name == "gunicorn_config.py"
        assert unit.value("KillSignal") == "SIGTERM" and unit.value("KillMode") == "mixed"
        assert unit.value("Restart") == "on-failure"
        assert (
            "/var/lib/" + unit.value("StateDirectory") == env_file(DEPLOY / "enrich.env.example")["DATA_DIR"]
        )
    web = Unit.read("enrich-web.service")
    assert float(web.value("TimeoutStopSec")) > float(options(launched["web"])[0]["--graceful-timeout"])
    # A task lasts at most a source call and then its CEP's (call_pool.wait_for_cep_fetch), plus 1 s.
    longest_task = 2 * Settings.from_env({}).source_timeout + 1
    assert float(Unit.read("enrich-worker@.service").value("TimeoutStopSec")) > longest_task + 30


def test_beat_is_started_exactly_once_by_the_units_and_the_procfile():
    units = sorted(path.name for path in DEPLOY.glob("*.service"))
    runs_beat = [name for name in units if " beat" in Unit.read(name).value("ExecStart")]
    assert runs_beat == ["enrich-beat.service"]  # not a template: one per machine that enables it
    assert "@" not in runs_beat[0] and "%i" not in (DEPLOY / runs_beat[0]).read_text()
    assert [kind for kind, command in procfile() if " beat" in command] == ["beat"]
    for kind, command in [*procfile(), *((n, Unit.read(n).value("ExecStart")) for n in units)]:
        assert not {"-B", "--beat"} & set(command.split()), kind  # no worker with an embedded beat
    worker_name = options(Unit.read("enrich-worker@.service").value("ExecStart").split())[0]["-n"]
    assert "%i" in worker_name  # instances on one machine get distinct node names


def test_the_env_example_sets_only_real_settings_and_loads():
    example = DEPLOY / "enrich.env.example"
    names = {item.name.upper() for item in dataclasses.fields(Settings) if item.name != "sources"}
    for name in env_file(example, commented=True):
        assert name in names or name in SOURCE_VARIABLES, f"{name} is not a setting"
    values = env_file(example)
    assert "WORKER_METRICS_PORT" not in values  # the worker unit sets it per instance (%i)
    settings = Settings.from_env(values)
    profile = PROFILES[settings.profile]
    assert settings.profile == "production" and settings.sources_mode == "live"
    assert settings.web_workers == profile["web_workers"] and settings.log_format == profile["log_format"]


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    host = Host(Path("/var/lib"), {}, "")
    env_copy = tmp_path / "enrich.env"
    shutil.copy(DEPLOY / "enrich.env.example", env_copy)
    for name in UNITS:
        text = host.path((DEPLOY / name).read_text()).replace(ENV_FILE, str(env_copy))
        (tmp_path / name).write_text(text)
    (tmp_path / "enrich-worker@9101.service").write_text((tmp_path / "enrich-worker@.service").read_text())
    files = [str(tmp_path / name) for name in (*UNITS, "enrich-worker@9101.service")]
    result = subprocess.run([analyze, "verify", *files], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "enrich" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_the_readme_deploy_section_names_every_deploy_file():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    for path in DEPLOY.iterdir():
        assert f"deploy/{path.name}" in section or f"`{path.name}`" in section, path.name
