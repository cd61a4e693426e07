"""Benchmark 2: uncached lookup latency with every upstream answering in 100 ms, one lookup at a time.

Ours: the time from sending `POST /api/lookups` (fresh identifier, `refresh: true`) to reading the
`complete` event on its stream; the sources run in parallel, so the floor is the slowest source
(100 ms) and the rest is overhead.  The serial baseline (bench/baselines/serial_app.py) calls the
sources one after another: its floor is their sum.  Goals (issue 5): median overhead above the
slowest source at most 20 ms, p95 at most 50 ms.

    .venv/bin/python bench/uncached_latency.py            # 3 repeats of 40 lookups per type
    .venv/bin/python bench/uncached_latency.py --quick    # one repeat of 8; rewrites nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402
from deployment import ROOT, deployment, serial_baseline  # noqa: E402
from sandbox_fixture import GENERATORS  # noqa: E402
from sse_client import Event, read_all  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- uncached_latency:begin -->", "<!-- uncached_latency:end -->"
LATENCY_MS = 100
SOURCES_PER_TYPE = {"cnpj": 3, "cep": 2}


def ours(web_url: str, identifier: str) -> float:
    started = time.perf_counter()
    created = requests.post(
        f"{web_url}/api/lookups", json={"identifier": identifier, "refresh": True}, timeout=30
    )
    created.raise_for_status()
    records = read_all(web_url + created.json()["links"]["events"], timeout=60)
    elapsed = time.perf_counter() - started
    assert any(isinstance(r, Event) and r.type == "complete" for r in records), (
        "the stream ended without complete"
    )
    return elapsed * 1000


def serial(url: str, identifier: str) -> float:
    started = time.perf_counter()
    requests.post(f"{url}/api/lookups", json={"identifier": identifier}, timeout=30).raise_for_status()
    return (time.perf_counter() - started) * 1000


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 1),
        "p95": round(percentile(values, 0.95), 1),
        "max": round(max(values), 1),
    }


def spread(values: list[float]) -> str:
    text = f"{statistics.median(values):.1f}"
    return text + (f" ({min(values):.1f}–{max(values):.1f})" if len(set(values)) > 1 else "")


def section(report: dict) -> str:
    rows = []
    for kind, runs in report["by_type"].items():
        overhead_median = [r["ours"]["median"] - LATENCY_MS for r in runs]
        overhead_p95 = [r["ours"]["p95"] - LATENCY_MS for r in runs]
        serial_median = [r["serial"]["median"] for r in runs]
        ours_median = [r["ours"]["median"] for r in runs]
        met = statistics.median(overhead_median) <= 20 and statistics.median(overhead_p95) <= 50
        rows.append(
            f"| {kind.upper()} ({SOURCES_PER_TYPE[kind]} sources) | {spread(ours_median)} | "
            f"{spread(overhead_median)} / {spread(overhead_p95)} | {spread(serial_median)} | "
            f"{statistics.median(serial_median) / statistics.median(ours_median):.2f}x | "
            f"≤ 20 / ≤ 50 | {'yes' if met else '**no**'} |"
        )
    return f"""{BEGIN}
## Uncached lookup latency (`bench/uncached_latency.py`)

Last run {report["date"]} on {report["cpu_count"]} CPUs (1-min load average {report["load_average_1m"]}), `{report["command"]}`.
Every upstream answers in {LATENCY_MS} ms (sandbox), quotas and limits off, one lookup at a time with a fresh
identifier: ours from sending the POST to reading `complete` on the lookup's stream; the serial baseline
(gunicorn sync workers, sources one after another) until its answer. Median of {report["repeats"]} repeat(s) of
{report["lookups"]} lookups per type, (min–max). Raw figures: `{report["results_file"]}`.

| type | ours, median ms | overhead above the slowest source, median / p95 ms | serial baseline, median ms | speed-up | goal (ms) | met |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

A company lookup (CNPJ) also checks the company's CEP against a CEP source; when that CEP is not cached
yet, the final step calls the CEP source itself, one more upstream round after the slowest company source.
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
    parser.add_argument(
        "--quick", action="store_true", help="one repeat of 8 lookups per type; rewrites no docs"
    )
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--lookups", type=int)
    arguments = parser.parse_args()
    repeats = arguments.repeats or (1 if arguments.quick else 3)
    count = arguments.lookups or (8 if arguments.quick else 40)
    by_type: dict[str, list[dict]] = {kind: [] for kind in SOURCES_PER_TYPE}
    with (
        tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp,
        deployment(Path(tmp), sandbox_latency_ms=LATENCY_MS) as stack,
        serial_baseline(stack, Path(tmp)) as serial_url,
    ):
        ours(stack.web_url, GENERATORS["cep"](1, 999)[0])  # warm both servers' code paths
        serial(serial_url, GENERATORS["cep"](1, 998)[0])
        for repeat in range(repeats):
            for kind in SOURCES_PER_TYPE:
                identifiers = GENERATORS[kind](2 * count, 5000 + repeat)
                by_type[kind].append(
                    {
                        "ours": summary([ours(stack.web_url, value) for value in identifiers[:count]]),
                        "serial": summary([serial(serial_url, value) for value in identifiers[count:]]),
                    }
                )
    stamp = datetime.datetime.now(datetime.UTC)
    name = f"uncached_latency-{'quick-' if arguments.quick else ''}{stamp:%Y%m%dT%H%M%SZ}.json"
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "repeats": repeats,
        "lookups": count,
        "command": "bench/uncached_latency.py" + (" --quick" if arguments.quick else ""),
        "results_file": f"bench/results/{name}",
        "upstream_latency_ms": LATENCY_MS,
        "by_type": by_type,
        "goals": {"overhead_median_ms": 20, "overhead_p95_ms": 50},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    if not arguments.quick:
        write_doc(section(report))
    print(json.dumps(by_type, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
