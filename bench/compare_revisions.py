"""Before/after: a benchmark run in two checkouts of the project, interleaved, median of N each.

For a change that must not make the service slower (a restructure): the same benchmark's quick
run alternates between an older checkout (its own `.venv`, e.g. made with `make .venv/.dev` there)
and this one, in the order before/after, after/before, ..., so that the machine's drift falls on
both sides alike.  Prints each run's headline figures and the medians side by side; writes nothing
under docs/ and deletes the result files the quick runs leave.

    git worktree add /tmp/before REV && make -C /tmp/before .venv/.dev
    .venv/bin/python -m bench.compare_revisions /tmp/before --runs 3
    .venv/bin/python -m bench.compare_revisions /tmp/before --benchmarks cached_lookup --seconds 8

An older checkout whose benchmarks are scripts (`bench/NAME.py`, before bench/ became a package)
is run as a script; this one as `python -m bench.NAME`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import ROOT, log

FIGURES = {
    "cached_lookup": ("cached_rps", "healthz_rps", "ratio", "cached_p99_ms", "half_p99_ms"),
    "throughput": ("ours_rps", "ours_p95_ms", "serial_rps", "serial_p95_ms"),
}


def command(root: Path, name: str) -> list[str]:
    python = str(root / ".venv" / "bin" / "python")
    if (root / "bench" / "__init__.py").exists():
        return [python, "-m", f"bench.{name}"]
    return [python, f"bench/{name}.py"]


def run_once(root: Path, name: str, seconds: float) -> dict[str, float]:
    """One quick run of benchmark `name` in checkout `root`: its summary's headline figures."""
    results = root / "bench" / "results"
    before = set(results.glob(f"{name}-*.json"))
    finished = subprocess.run(
        [*command(root, name), "--quick", "--seconds", str(seconds)], cwd=root, capture_output=True, text=True
    )
    new = sorted(set(results.glob(f"{name}-*.json")) - before)
    if finished.returncode != 0 or not new:
        raise SystemExit(f"{name} failed in {root}:\n{finished.stdout[-2000:]}\n{finished.stderr[-3000:]}")
    summary = json.loads(new[-1].read_text())["summary"]
    for path in new:
        path.unlink()
    figures = {}
    for key in FIGURES[name]:
        value = summary.get(key)
        figures[key] = value["median"] if isinstance(value, dict) else value
    return figures


def compare(before: Path, name: str, runs: int, seconds: float) -> dict[str, dict[str, float]]:
    """`runs` runs of `name` on each side, interleaved; the medians."""
    sides = {"before": before, "after": ROOT}
    seen: dict[str, list[dict]] = {"before": [], "after": []}
    for index in range(runs):
        for side in ("before", "after") if index % 2 == 0 else ("after", "before"):
            started = time.monotonic()
            seen[side].append(run_once(sides[side], name, seconds))
            log(f"{name} run {index + 1} {side}: {seen[side][-1]} ({time.monotonic() - started:.0f} s)")
    return {
        side: {key: statistics.median(run[key] for run in seen[side]) for key in FIGURES[name]}
        for side in sides
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the older checkout, with its own .venv")
    parser.add_argument("--benchmarks", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument("--runs", type=int, default=3, help="runs on each side")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per side of each quick run")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name in arguments.benchmarks:
        medians = compare(arguments.before.resolve(), name, arguments.runs, arguments.seconds)
        print(f"\n{name}: median of {arguments.runs} runs each, interleaved")
        for key in FIGURES[name]:
            old, new = medians["before"][key], medians["after"][key]
            change = f"{100 * (new - old) / old:+.1f}%" if old else "n/a"
            print(f"  {key:16} before {old:10.3f}  after {new:10.3f}  {change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
