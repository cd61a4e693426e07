"""Where the CPU of an uncached lookup goes: py-spy on the web and worker processes under load.

The same deployment and load as bench/throughput.py (sandbox at 50 ms, quotas and limits off, 64
clients each sending its next unique CNPJ and following its event stream), while `py-spy record`
samples every process of the web server and of the worker node (`--subprocesses`, 100 Hz,
`--gil`: only samples holding the GIL, i.e. Python's own CPU).  Prints and writes, per process
kind, the share of samples whose stack passes through each area (inclusive: a sample counts once
per area it passes through, so shares add to more than 100%), and the top functions by own time.

    .venv/bin/python -m bench.profile_uncached              # 20 s of load; writes bench/results/
    .venv/bin/python -m bench.profile_uncached --seconds 8  # shorter

A full run rewrites its section of docs/benchmarks.md; `--quick` (8 s) rewrites nothing.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import harness
from bench.deployment import http_load, service
from bench.harness import GENERATORS, log

NAME = "profile_uncached"
# An area is the first of these substrings found in a frame's file path or function name.
AREAS = {
    "requests/urllib3 (upstream HTTP)": ("requests/", "urllib3/"),
    "redis-py (Redis round trips)": ("redis/",),
    "kombu (broker messages)": ("kombu/",),
    "celery (task handling)": ("celery/", "billiard/"),
    "gevent/gunicorn": ("gevent/", "gunicorn/"),
    "flask/werkzeug": ("flask/", "werkzeug/", "flask_sse/"),
    "service code (enrich/, top-level modules)": ("enrich/", "/app.py", "/job_queue.py", "sse_streaming.py"),
    "pybreaker": ("pybreaker",),
    "prometheus_client": ("prometheus_client/",),
    "logging": ("logging/", "pythonjsonlogger/"),
    "json (orjson, json)": ("json/", "orjson"),
}


def summarize(collapsed: Path) -> dict:
    """Shares of samples by area (inclusive) and the top own-time functions, from py-spy's raw output."""
    total = 0
    areas: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        hit = {
            area for area, needles in AREAS.items() for frame in frames if any(n in frame for n in needles)
        }
        for area in hit:
            areas[area] += count
        own[frames[-1]] += count
    return {
        "samples": total,
        "areas": {area: round(n / max(1, total), 3) for area, n in areas.most_common()},
        "top_own": [[frame, round(n / max(1, total), 3)] for frame, n in own.most_common(25)],
    }


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: harness.Processes) -> dict:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        identifiers = iter(GENERATORS["cnpj"](int(arguments.seconds * 400) + 400, 91))
        with service(tmp, processes, sandbox_latency_ms=50) as deployed:
            warm = [{"identifier": next(identifiers)} for _ in range(200)]
            http_load(
                f"{deployed.web_url}/api/lookups",
                tmp,
                bodies=warm,
                method="POST",
                connections=64,
                seconds=2,
                follow="sse",
            )
            recorders = {}
            for name in ("web", "worker"):
                out = tmp / f"{name}.collapsed"
                recorders[name] = (
                    subprocess.Popen(
                        [
                            spy,
                            "record",
                            "--pid",
                            str(processes.children[name].pid),
                            "--subprocesses",
                            "--gil",
                            "--rate",
                            "100",
                            "--duration",
                            str(int(arguments.seconds)),
                            "--format",
                            "raw",
                            "--output",
                            str(out),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    ),
                    out,
                )
            time.sleep(0.5)  # py-spy attaches
            load = http_load(
                f"{deployed.web_url}/api/lookups",
                tmp,
                bodies=[{"identifier": next(identifiers)} for _ in range(int(arguments.seconds * 400))],
                method="POST",
                connections=64,
                seconds=arguments.seconds,
                follow="sse",
            )
            profiles = {}
            for name, (recorder, out) in recorders.items():
                _, error = recorder.communicate(timeout=arguments.seconds + 60)
                if recorder.returncode != 0 or not out.exists():
                    raise RuntimeError(f"py-spy on {name} failed: {error.decode()[-2000:]}")
                profiles[name] = summarize(out)
                if not arguments.quick:  # a full run keeps the raw stacks (py-spy's collapsed format)
                    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                    shutil.copy(out, harness.RESULTS / f"{NAME}-{name}-{stamp}.txt")
        for name, profile in profiles.items():
            log(f"{name}: {profile['samples']} samples holding the GIL")
            for area, share in profile["areas"].items():
                log(f"  {share:6.1%}  {area}")
        log(f"load: {load['rps']:.1f} lookups/s, p95 {load['p95_ms']:.0f} ms")
        return {
            "settings": {"seconds": arguments.seconds, "clients": 64, "upstream_latency_ms": 50},
            "load": {key: load[key] for key in ("rps", "p50_ms", "p95_ms", "requests", "failed")},
            "profiles": profiles,
        }

    return run


def markdown(report: dict) -> str:
    profiles, load = report["profiles"], report["load"]
    names = list(profiles)
    areas = list(dict.fromkeys(area for name in names for area in profiles[name]["areas"]))
    rows = "\n".join(
        f"| {area} | " + " | ".join(f"{profiles[name]['areas'].get(area, 0):.0%}" for name in names) + " |"
        for area in areas
    )
    tops = "\n".join(
        f"- {name}: " + "; ".join(f"`{frame}` {share:.0%}" for frame, share in profiles[name]["top_own"][:8])
        for name in names
    )
    return (
        harness.header(report, "Where an uncached lookup's CPU goes (`bench/profile_uncached.py`)")
        + f"""
`py-spy record --subprocesses --gil --rate 100` on the web server and the worker node for {report["settings"]["seconds"]:g} s
of the throughput benchmark's load (50 ms upstreams, 64 clients, unique CNPJs, each following its event
stream): {load["rps"]:.1f} lookups/s, p95 {load["p95_ms"]:.0f} ms while sampled (py-spy costs some CPU too).
Share of the samples holding the GIL whose stack passes through each area (inclusive: a sample counts in
every area on its stack, so a column adds to more than 100%).

| area | {" | ".join(f"{name} ({profiles[name]['samples']} samples)" for name in names)} |
|---|{"---|" * len(names)}
{rows}

Most own time (the innermost frame):
{tops}
"""
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 s of load")
    parser.add_argument("--seconds", type=float)
    arguments = parser.parse_args(argv)
    arguments.seconds = arguments.seconds or (8.0 if arguments.quick else 20.0)
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
