"""Web CPU per request: a cached `POST /api/lookups` and `GET /healthz`, each at a fixed 600/s.

Throughput on a shared 2-core machine swings by a third from one minute to the next; CPU seconds
the web processes spent per request at a rate they can keep up with move far less, so this is
how a change's cost on the cached path is compared (before/after on the same machine, e.g. with
a `git worktree` of the earlier commit).  Prints milliseconds per request, three runs each:

    .venv/bin/python -m bench.cpu_per_request
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import psutil

from bench import harness
from bench.cached_lookup import IDENTIFIER, warm
from bench.deployment import http_load, service

RATE = 600  # requests/s: well under either side's peak, so neither waits for CPU


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (gunicorn's master and workers)."""
    parent = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def per_request(web: int, url: str, tmp: Path, **options) -> float:
    """Milliseconds of web CPU per request over 8 s at RATE."""
    before = cpu_seconds(web)
    out = http_load(url, tmp, connections=16, seconds=8, rate=RATE, **options)
    return (cpu_seconds(web) - before) * 1000 / out["requests"]


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        processes = harness.Processes(tmp)
        with service(tmp, processes, sandbox_latency_ms=0) as deployed:
            warm(deployed.web_url)
            url, payload = f"{deployed.web_url}/api/lookups", json.dumps({"identifier": IDENTIFIER})
            http_load(url, tmp, method="POST", body=payload, connections=8, seconds=1)  # warm-up
            web = processes.children["web"].pid
            cached = [per_request(web, url, tmp, method="POST", body=payload) for _ in range(3)]
            healthz = [per_request(web, f"{deployed.web_url}/healthz", tmp) for _ in range(3)]
    print(
        "web CPU ms per request: cached lookup",
        [round(v, 3) for v in cached],
        "healthz",
        [round(v, 3) for v in healthz],
    )


if __name__ == "__main__":
    main()
