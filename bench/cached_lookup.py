"""Benchmark 1: a cached lookup (`POST /api/lookups` answered from the cache) against `GET /healthz`.

Both run on the same server (gunicorn, one gevent worker, the service's settings with the
per-client limit off), driven by the same load generator (bench/http_load.py, a separate
process): first each at full speed (closed loop, 32 connections), then the cached lookup at
half of its own peak rate, where its p99 is judged.  Goals (issue 5): cached throughput at
least 0.6 of healthz's; p99 under 10 ms at half of peak.

    .venv/bin/python bench/cached_lookup.py            # 3 repeats, rewrites its docs section
    .venv/bin/python bench/cached_lookup.py --quick    # one short repeat; rewrites nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deployment import ROOT, Stack, _wait, deployment  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- cached_lookup:begin -->", "<!-- cached_lookup:end -->"
IDENTIFIER = "11222333000181"  # one hot company: every request reads the same cached entries


def load(url: str, seconds: float, method: str = "GET", body: str = "", rate: float | None = None) -> dict:
    command = [
        sys.executable,
        str(ROOT / "bench" / "http_load.py"),
        url,
        "--method",
        method,
        "--seconds",
        str(seconds),
        "--connections",
        "32",
    ]
    if body:
        command += ["--body", body]
    if rate:
        command += ["--rate", str(rate)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout)


def measure(stack: Stack, seconds: float) -> dict:
    body = json.dumps({"identifier": IDENTIFIER})
    healthz = load(f"{stack.web_url}/healthz", seconds)
    cached = load(f"{stack.web_url}/api/lookups", seconds, "POST", body)
    assert set(cached["statuses"]) == {"200"}, f"not every lookup came from the cache: {cached['statuses']}"
    half = load(f"{stack.web_url}/api/lookups", seconds, "POST", body, rate=cached["rps"] / 2)
    return {
        "healthz": healthz,
        "cached": cached,
        "cached_half_load": half,
        "ratio": round(cached["rps"] / healthz["rps"], 3),
    }


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def section(report: dict) -> str:
    s = report["summary"]

    def cell(d: dict, unit: str = "") -> str:
        low_high = f" ({d['min']:g}–{d['max']:g})" if d["min"] != d["max"] else ""
        return f"{d['median']:g}{unit}{low_high}"

    ratio_met = (
        "yes" if s["ratio"]["median"] >= 0.6 else f"**no** ({s['ratio']['median'] / 0.6:.0%} of the goal)"
    )
    p99_met = "yes" if s["p99_half_ms"]["median"] < 10 else "**no**"
    return f"""{BEGIN}
## Cached lookup against healthz (`bench/cached_lookup.py`)

Last run {report["date"]} on {report["cpu_count"]} CPUs (1-min load average {report["load_average_1m"]}), `{report["command"]}`.
One gunicorn gevent worker; `POST /api/lookups` for one cached company (three sources and its CEP in the cache) and
`GET /healthz` on the same server, 32 keep-alive connections from `bench/http_load.py` in its own process on the same
2 cores; median of {report["repeats"]} repeat(s) of {report["seconds"]:g} s, (min–max). Raw figures: `{report["results_file"]}`.

| figure | ours | baseline (healthz) | ratio | goal | met |
|---|---|---|---|---|---|
| requests/s at full speed | {cell(s["cached_rps"])} | {cell(s["healthz_rps"])} | {cell(s["ratio"])} | ≥ 0.6 of healthz | {ratio_met} |
| p50 / p99 ms at full speed | {cell(s["p50_full_ms"])} / {cell(s["p99_full_ms"])} | {cell(s["healthz_p99_ms"])} (p99) | | | |
| p99 ms at half of peak | {cell(s["p99_half_ms"])} | | | < 10 ms | {p99_met} |

A cached lookup costs two Redis round trips (one read: the generation, the company's entries and its CEP's for
the cross-check; one write: the lookup record that `GET /api/lookups/<id>` and the stream serve) plus the merge
and its JSON; healthz costs none. The next step the issue names is an in-process near cache kept honest by
invalidation messages, which would leave only the record write.
{END}"""


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + text + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 3 s repeat; rewrites no docs")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seconds", type=float)
    arguments = parser.parse_args()
    repeats = arguments.repeats or (1 if arguments.quick else 3)
    seconds = arguments.seconds or (3.0 if arguments.quick else 10.0)
    with tempfile.TemporaryDirectory(prefix="bench-cached-") as tmp, deployment(Path(tmp)) as stack:
        first = stack.post_lookup(IDENTIFIER, refresh=True).json()
        stack.wait_status(first["id"], timeout=60)
        _wait(lambda: stack.post_lookup(IDENTIFIER).status_code == 200, 30, "the cache to be warm")
        runs = [measure(stack, seconds) for _ in range(repeats)]
    stamp = datetime.datetime.now(datetime.UTC)
    name = f"cached_lookup-{'quick-' if arguments.quick else ''}{stamp:%Y%m%dT%H%M%SZ}.json"
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "repeats": repeats,
        "seconds": seconds,
        "command": "bench/cached_lookup.py" + (" --quick" if arguments.quick else ""),
        "results_file": f"bench/results/{name}",
        "runs": runs,
        "summary": {
            "cached_rps": spread([r["cached"]["rps"] for r in runs]),
            "healthz_rps": spread([r["healthz"]["rps"] for r in runs]),
            "ratio": spread([r["ratio"] for r in runs]),
            "p50_full_ms": spread([r["cached"]["p50_ms"] for r in runs]),
            "p99_full_ms": spread([r["cached"]["p99_ms"] for r in runs]),
            "healthz_p99_ms": spread([r["healthz"]["p99_ms"] for r in runs]),
            "p99_half_ms": spread([r["cached_half_load"]["p99_ms"] for r in runs]),
        },
        "goals": {"ratio": 0.6, "p99_half_ms": 10},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    if not arguments.quick:
        write_doc(section(report))
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
