"""Shared plumbing of the benchmarks, each run from the repository's root as `python -m bench.NAME`.

Processes in their own sessions, stopped as groups on exit or Ctrl-C; an embedded Valkey on a
free port; waiting for a server to answer; results JSON under bench/results/; each benchmark's
own section of docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich.identifiers import cnpj_check_digits

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
SOURCES = ("BRASILAPI", "RECEITAWS", "OPENCNPJ", "VIACEP")
NO_QUOTAS = {f"SANDBOX_QUOTA_{name}": "none" for name in SOURCES}
NO_LIMITS = {f"RATE_LIMIT_{name}": "6000000" for name in SOURCES}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes ---------------------------------------------------------------------------------


class Processes:
    """Child processes, each in its own session; `stop()` signals each whole group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: dict[str, subprocess.Popen] = {}

    def spawn(
        self, name: str, command: list[str], env: dict, cwd: Path = ROOT, *, piped: bool = False
    ) -> subprocess.Popen:
        """Start `command`, its output in `<tmp>/<name>.log`; `piped`: text stdin and stdout are pipes
        to this process (a client driven by commands), only stderr goes to the log."""
        output = (self.tmp / f"{name}.log").open("wb")
        if piped:
            streams = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": output, "text": True}
        else:
            streams = {"stdout": output, "stderr": subprocess.STDOUT}
        process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **streams)
        self.children[name] = process
        return process

    def log_tail(self, name: str, size: int = 3000) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def stop(self, name: str, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the child's whole group; SIGKILL it if it is still running after `timeout`."""
        process = self.children.pop(name, None)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.children)):
            self.stop(name)


def wait_for(condition: Callable[[], object], timeout: float, what: str, process=None, tail=None) -> object:
    """Poll `condition` until it is truthy; fail at the deadline or when `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{tail() if tail else ''}")
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{tail() if tail else ''}")


def answers(url: str, expect: int = 200) -> bool:
    """Whether a GET of `url` is answered with `expect` within a second (readiness polls)."""
    try:
        return requests.get(url, timeout=1).status_code == expect
    except requests.RequestException:
        return False


def start_redis(tmp: Path) -> EmbeddedRedis:
    """An embedded Valkey on a free port without AOF (the benchmark's data is thrown away)."""
    server = EmbeddedRedis(free_port(), tmp / "redis", appendonly=False)
    server.start()
    return server


def start_sandbox(processes: Processes, env: dict) -> str:
    """The sandbox upstream (one gevent worker, as `make run`, counting each request when the kernel
    stamped its arrival: devstack.sandbox_worker); returns its URL."""
    port = free_port()
    process = processes.spawn(
        "sandbox",
        [
            str(BIN / "gunicorn"),
            "-k",
            "devstack.sandbox_worker.StampingGeventWorker",
            "-w",
            "1",
            "--no-control-socket",
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "devstack.sandbox:create_app()",
        ],
        {**os.environ, **env},
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: answers(f"{url}/healthz"), 30, "the sandbox", process, lambda: processes.log_tail("sandbox")
    )
    return url


def valid_cnpjs(count: int, seed: int) -> list[str]:
    """`count` distinct valid numeric CNPJs (head office, check digits computed)."""
    generator = random.Random(seed)
    values: dict[str, None] = {}
    while len(values) < count:
        base = f"{generator.randrange(10**7, 10**8)}0001"
        values[base + cnpj_check_digits(base)] = None
    return list(values)


# The identifiers tests/sandbox_fixture.py generates for a seed (its numeric CNPJs and its CEPs), the
# same ones, so that a benchmark and a test of the same seed see the same sandbox answers.


def generated_cnpjs(count: int, seed: int = 1) -> list[str]:
    """`count` valid, distinct, reproducible numeric CNPJs (head office)."""
    generator = random.Random(seed)
    values: dict[str, None] = {}
    while len(values) < count:
        base = "".join(generator.choice("0123456789") for _ in range(8)) + "0001"
        values[base + cnpj_check_digits(base)] = None
    return list(values)


def generated_ceps(count: int, seed: int = 1) -> list[str]:
    """`count` distinct, reproducible CEPs."""
    generator = random.Random(seed)
    return [f"{value:08d}" for value in generator.sample(range(1_000_000, 99_999_999), count)]


GENERATORS: dict[str, Callable[[int, int], list[str]]] = {"cnpj": generated_cnpjs, "cep": generated_ceps}


# -- figures ------------------------------------------------------------------------------------


def spread(values: list[float | None]) -> dict:
    """Median with min and max of repeated runs (None values ignored)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cell(summary: dict, digits: int = 1, number: Callable[[object], str] | None = None) -> str:
    """'median (min–max)', or the median alone when every run gave the same figure.

    `number` formats each figure (default: `fmt` with `digits`).
    """
    number = number or (lambda value: fmt(value, digits))
    text = number(summary["median"])
    if summary["min"] is not None and summary["min"] != summary["max"]:
        text += f" ({number(summary['min'])}–{number(summary['max'])})"
    return text


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_section(name: str, section: str) -> None:
    """Put `section` between this benchmark's markers in docs/benchmarks.md (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text()
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        marker = "## What was found and changed"
        if marker in text:
            head, tail = text.split(marker, 1)
            text = head + block + "\n\n" + marker + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def run_benchmark(name: str, quick: bool, argv: list[str], body: Callable[[Path, Processes], dict], markdown):
    """Run `body(tmp, processes)`, save its report, and (full runs only) rewrite the doc section."""
    started = dt.datetime.now(dt.UTC)
    load_start = round(os.getloadavg()[0], 2)

    def terminate(signum, frame):  # SIGTERM/SIGHUP unwind through the cleanup like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    processes = Processes(tmp)
    try:
        report = body(tmp, processes)
    except KeyboardInterrupt:
        log("interrupted; stopping every process")
        return 130
    except Exception:
        for path in sorted(tmp.glob("*.log")):
            sys.stderr.write(f"--- {path.name} ---\n{path.read_text(errors='replace')[-2000:]}\n")
        raise
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    file_name = f"{name}-quick-{stamp}.json" if quick else f"{name}-{stamp}.json"
    report.update(
        {
            "benchmark": name,
            "quick": quick,
            "file": file_name,
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python", "-m", f"bench.{name}", *argv]),
            "load_average_1m_at_start": load_start,
            "machine": machine(),
        }
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / file_name).write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    print(section)
    if quick:
        log(f"wrote bench/results/{file_name} (quick: docs/benchmarks.md left alone)")
    else:
        write_section(name, section)
        log(f"wrote bench/results/{file_name} and its section of docs/benchmarks.md")
    return 0


def render(name: str, path: str, markdown) -> int:
    """Rewrite the doc section from a saved full run's JSON (after editing the prose, without rerunning)."""
    report = json.loads(Path(path).read_text())
    if report.get("quick"):
        raise SystemExit("a quick run's figures never go into docs/benchmarks.md")
    section = markdown(report)
    write_section(name, section)
    print(section)
    return 0


def header(report: dict, title: str) -> str:
    m = report["machine"]
    return (
        f"## {title}\n\n"
        f"Last run {report['date']} on {m['cpu_count']} CPUs ({m['cpu_model'] or 'unknown model'}, "
        f"{m['memory_gib']} GiB; 1-min load average {report['load_average_1m_at_start']} at the start, "
        f"{m['load_average_1m']} at the end), `{report['command']}`. "
        f"Raw figures: `bench/results/{report['file']}`.\n"
    )
