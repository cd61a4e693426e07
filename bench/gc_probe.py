"""gunicorn config for the benchmarks: records the worker's garbage-collection pauses, nothing else.

Passed with `-c bench/gc_probe.py`; every other gunicorn setting keeps its default.  Each
collection longer than 1 ms is appended to $BENCH_GC_LOG as "end time, milliseconds, generation",
so that the benchmark can tell a whole-worker pause from slow streaming.
"""

from __future__ import annotations

import gc
import os
import time


def post_fork(server, worker) -> None:
    path = os.environ.get("BENCH_GC_LOG")
    if not path:
        return
    log = open(path, "a", buffering=1)  # kept open for the life of the worker
    started = [0.0]

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        elapsed = (time.perf_counter() - started[0]) * 1000
        if elapsed > 1.0:
            log.write(f"{time.time():.4f} {elapsed:.2f} {info['generation']}\n")

    gc.callbacks.append(record)
