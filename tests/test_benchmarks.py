"""Every benchmark runs as `python -m bench.NAME --quick`, once per suite (figures: `make bench`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = re.search(r"^BENCHMARKS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_benchmark_runs_in_quick_mode(name):
    if name == "cached_lookup" and shutil.which("wrk") is None:  # its full-speed figures come from wrk
        pytest.skip("*** wrk missing: make wrk installs it ***")
    script = ROOT / "bench" / f"{name}.py"
    assert script.exists(), f"make bench lists {name} but bench/{name}.py is missing"
    results = ROOT / "bench" / "results"
    before = set(results.glob("*-quick-*.json"))
    docs_before = (ROOT / "docs" / "benchmarks.md").read_text()
    finished = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    written = set(results.glob("*-quick-*.json")) - before
    assert written, "the quick run wrote no results file"
    for path in written:
        json.loads(path.read_text())
        path.unlink()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs_before, (
        "a quick run must not rewrite the docs"
    )
