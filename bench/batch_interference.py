"""Benchmark of issue 7: interactive lookups while a large bulk batch runs, against the same lookups idle.

The real deployment (bench/deployment.py: gunicorn web, one Celery worker node, embedded Valkey,
the sandbox) with the upstreams' real quotas (the sandbox's defaults) and the service's default
source rate limits and batch settings (BATCH_CONCURRENCY 8, BATCH_TOKEN_RESERVE 2); every upstream
answers in 100 ± 50 ms.  Only the per-client limit is off: the interactive lookups stand for many
people, all of whom come from 127.0.0.1 here.

Each repeat: (a) idle, N interactive lookups of fresh CEPs at a fixed rate (bench/http_load.py,
open loop, its own process), each timed from sending `POST /api/lookups` to reading `complete` on
its event stream; (b) a batch of fresh CNPJs and CEPs posted to `/api/batches`, and once its items
flow, N more interactive lookups of other fresh CEPs the same way; then the batch is cancelled
and its items in flight finish before the next repeat.  Interactive lookups are CEPs because
ReceitaWS's real quota (3 a minute) keeps a company lookup from completing at a person's pace
even on an idle service.  Goal (issue 7): p95 during the batch at most twice the idle p95.

    .venv/bin/python bench/batch_interference.py           # 3 repeats of 40 lookups a phase at 1/s, 10,000 rows
    .venv/bin/python bench/batch_interference.py --quick   # one repeat of 8 at 2/s, 1,000 rows (< 60 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import requests  # noqa: E402
from deployment import Service, http_load, service  # noqa: E402
from harness import cell, fmt, log, spread, wait_for  # noqa: E402
from http_load import percentile  # noqa: E402
from sandbox_fixture import GENERATORS  # noqa: E402
from throughput import cpu_seconds  # noqa: E402

from embedded_redis import free_port  # noqa: E402

NAME = "batch_interference"
LATENCY_MS, JITTER_MS = 100, 50
GOAL_RATIO = 2.0
UPSTREAMS = ("brasilapi", "receitaws", "opencnpj", "viacep")


def _get(url: str, timeout: float = 10) -> dict:
    response = requests.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()


def sandbox_counts(deployed: Service) -> dict[str, dict]:
    """Per upstream: requests served so far, and how many of them were refused over quota (429)."""
    stats = _get(f"{deployed.sandbox_url}/_stats")["upstreams"]
    return {
        name: {"requests": s["requests"], "over_quota": s["by_status"].get("429", 0)}
        for name, s in stats.items()
    }


def counts_delta(after: dict, before: dict) -> dict:
    return {name: {k: v - before[name][k] for k, v in values.items()} for name, values in after.items()}


class StatusSampler:
    """`GET /api/status` once a second in a thread: queue depths, deferred calls, tokens left."""

    def __init__(self, web_url: str) -> None:
        self.url = f"{web_url}/api/status"
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                body = _get(self.url, timeout=5)
            except requests.RequestException:
                continue
            self.samples.append(
                {
                    "queued": sum(
                        int(n) for n in body["queues"]["by_priority"].values() if isinstance(n, int)
                    ),
                    "by_priority": body["queues"]["by_priority"],
                    "deferred": body["queues"]["deferred"],
                    "tokens": {name: r["tokens"] for name, r in body["rate_limits"].items()},
                }
            )

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {
            "samples": len(self.samples),
            "queued_max": max(s["queued"] for s in self.samples),
            "queued_median": statistics.median(s["queued"] for s in self.samples),
            "deferred_max": max(
                s["deferred"] if isinstance(s["deferred"], int | float) else 0 for s in self.samples
            ),
            "tokens_min": {
                name: min(s["tokens"][name] for s in self.samples) for name in self.samples[0]["tokens"]
            },
            "tokens_median": {
                name: statistics.median(s["tokens"][name] for s in self.samples)
                for name in self.samples[0]["tokens"]
            },
        }


def slowest(deployed: Service, trace: list, count: int = 3) -> list[dict]:
    """The `count` slowest lookups of a phase, each with where its time went (its record's sources)."""
    rows = []
    for at, ms, lookup_id in sorted(trace, key=lambda entry: -entry[1])[:count]:
        row: dict = {"due_s": at, "ms": ms, "id": lookup_id}
        if lookup_id:
            try:
                lookup = _get(f"{deployed.web_url}/api/lookups/{lookup_id}")
            except requests.RequestException as error:
                row["error"] = str(error)
            else:
                created = lookup["created_at"]
                row["completed_after_ms"] = (
                    round((lookup["completed_at"] - created) * 1000, 1) if lookup["completed_at"] else None
                )
                row["sources"] = {
                    name: {
                        "state": s["state"],
                        "elapsed_ms": s["elapsed_ms"],
                        "attempts": s["attempts"],
                        "settled_after_ms": round((s["updated_at"] - created) * 1000, 1)
                        if s["updated_at"]
                        else None,
                    }
                    for name, s in lookup["sources"].items()
                }
        rows.append(row)
    return rows


def interactive(deployed: Service, tmp: Path, identifiers: list[str], arguments) -> dict:
    """N lookups at `arguments.rate` a second (open loop), each until `complete` on its stream."""
    summary = http_load(
        f"{deployed.web_url}/api/lookups",
        tmp,
        bodies=[{"identifier": value} for value in identifiers],
        method="POST",
        connections=32,  # enough that a slow lookup never holds up the next one's send
        seconds=len(identifiers) / arguments.rate + 5,
        rate=arguments.rate,
        follow="sse",
        timeout=120,
        samples=True,
        trace=True,
    )
    if summary["failed"] or summary["requests"] != len(identifiers):
        raise RuntimeError(f"interactive lookups failed: {summary}")
    return summary


def batch_identifiers(rows: int, seed: int, taken: set[str]) -> list[str]:
    """`rows` fresh identifiers, CNPJs and CEPs alternating, none of them in `taken`."""
    half = rows // 2 + 1
    cnpjs = [v for v in GENERATORS["cnpj"](half + 50, seed) if v not in taken][:half]
    ceps = [v for v in GENERATORS["cep"](half + 50, seed + 1) if v not in taken][:half]
    mixed = [value for pair in zip(cnpjs, ceps, strict=True) for value in pair][:rows]
    taken.update(mixed)
    return mixed


def during_batch(
    deployed: Service, tmp: Path, processes, identifiers: list[str], rows: list[str], arguments
) -> dict:
    """Post the batch, wait until its items flow, run the interactive lookups, then cancel it."""
    web = deployed.web_url
    began = time.perf_counter()
    response = requests.post(f"{web}/api/batches", json={"identifiers": rows, "name": "bench"}, timeout=120)
    if response.status_code != 202:
        raise RuntimeError(f"POST /api/batches answered {response.status_code}: {response.text[:500]}")
    created_ms = (time.perf_counter() - began) * 1000
    batch = response.json()
    status_url = f"{web}/api/batches/{batch['id']}"
    concurrency = deployed.settings.batch_concurrency

    def flowing() -> dict | None:
        body = _get(status_url)
        return body if body["done"] >= concurrency else None

    wait_for(flowing, 120, "the batch's first items")
    before, calls_before, cpu_before = _get(status_url), sandbox_counts(deployed), cpu_seconds(processes)
    window_began = time.time()
    with StatusSampler(web) as sampler:
        lookups = interactive(deployed, tmp, identifiers, arguments)
    window = time.time() - window_began
    after, calls_after, cpu_after = _get(status_url), sandbox_counts(deployed), cpu_seconds(processes)
    cancelled = requests.delete(status_url, timeout=30)
    cancelled.raise_for_status()
    finished = wait_for(
        lambda: (lambda b: b if b["finished_at"] else None)(_get(status_url)), 300, "the cancel"
    )
    done_in_window = after["done"] - before["done"]
    return {
        "lookups": lookups,
        "batch": {
            "id": batch["id"],
            "rows": len(rows),
            "items": batch["total"],
            "cached_at_creation": batch["cached"],
            "post_ms": round(created_ms, 1),
            "window_seconds": round(window, 2),
            "done_at_window_start": before["done"],
            "done_in_window": done_in_window,
            "items_per_second": round(done_in_window / window, 2),
            "counts_in_window": {
                state: after["counts"][state] - before["counts"][state]
                for state in ("found", "not_found", "partial", "failed")
            },
            "eta_seconds_at_window_end": after["eta_seconds"],
            "rate_limit_per_second": after["rate_limit_per_second"],
            "counts_at_end": finished["counts"],
        },
        "upstream_calls_in_window": counts_delta(calls_after, calls_before),
        "cpu_seconds_in_window": {
            name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after
        },
        "status_samples": sampler.summary(),
    }


def wait_idle(deployed: Service) -> None:
    """Nothing queued or deferred, and every CEP source's bucket full again, before an idle phase."""
    capacity = deployed.settings.sources["brasilapi"].burst + deployed.settings.batch_token_reserve

    def idle() -> bool:
        body = _get(f"{deployed.web_url}/api/status")
        queued = sum(n for n in body["queues"]["by_priority"].values() if isinstance(n, int))
        tokens = body["rate_limits"]
        full = all(tokens[name]["tokens"] >= capacity - 0.01 for name in ("brasilapi", "viacep"))
        return queued == 0 and not body["queues"]["deferred"] and full

    wait_for(idle, 120, "an idle service")


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: harness.Processes) -> dict:
        extra = {"WORKER_METRICS_PORT": str(free_port())}
        runs = []
        with service(
            tmp, processes, sandbox_latency_ms=LATENCY_MS, real_limits=True, extra_env=extra
        ) as deployed:
            for name in UPSTREAMS:  # 100 ± 50 ms, uniformly
                requests.post(
                    f"{deployed.sandbox_url}/_control",
                    json={"upstream": name, "latency_ms": LATENCY_MS, "jitter_ms": JITTER_MS},
                    timeout=5,
                ).raise_for_status()
            settings = deployed.settings
            ceps = iter(GENERATORS["cep"](2 * arguments.lookups * arguments.repeats + 8, 4242))
            taken: set[str] = set()

            def fresh(count: int) -> list[str]:
                values = [next(ceps) for _ in range(count)]
                taken.update(values)
                return values

            # Warm both paths (the lookup's and the batch's) before anything is timed.
            interactive(deployed, tmp, fresh(4), arguments)
            warm = requests.post(
                f"{deployed.web_url}/api/batches",
                json={"identifiers": batch_identifiers(20, 99, taken)},
                timeout=30,
            ).json()
            wait_for(
                lambda: _get(f"{deployed.web_url}/api/batches/{warm['id']}")["finished_at"],
                180,
                "the warm-up batch",
            )
            for repeat in range(arguments.repeats):
                wait_idle(deployed)
                calls_before, cpu_before = sandbox_counts(deployed), cpu_seconds(processes)
                with StatusSampler(deployed.web_url) as sampler:
                    idle = interactive(deployed, tmp, fresh(arguments.lookups), arguments)
                cpu_after = cpu_seconds(processes)
                idle_run = {
                    "lookups": idle,
                    "upstream_calls_in_window": counts_delta(sandbox_counts(deployed), calls_before),
                    "cpu_seconds_in_window": {
                        name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after
                    },
                    "status_samples": sampler.summary(),
                    "slowest": slowest(deployed, idle["trace"]),
                }
                rows = batch_identifiers(arguments.rows, 7000 + repeat, taken)
                during = during_batch(deployed, tmp, processes, fresh(arguments.lookups), rows, arguments)
                during["slowest"] = slowest(deployed, during["lookups"]["trace"])
                ratio = during["lookups"]["p95_ms"] / idle["p95_ms"]
                log(
                    f"repeat {repeat + 1}: idle p50/p95 {idle['p50_ms']:.0f}/{idle['p95_ms']:.0f} ms, during "
                    f"{during['lookups']['p50_ms']:.0f}/{during['lookups']['p95_ms']:.0f} ms (ratio {ratio:.2f}); "
                    f"batch {during['batch']['items_per_second']:.1f} items/s, "
                    f"{during['batch']['done_in_window']} done in the window"
                )
                runs.append({"idle": idle_run, "during": during, "p95_ratio": ratio})
        pooled = {}
        for phase in ("idle", "during"):
            samples = sorted(ms for r in runs for ms in r[phase]["lookups"]["samples_ms"])
            pooled[phase] = {
                "lookups": len(samples),
                **{
                    f"p{label}_ms": percentile([s / 1000 for s in samples], share)
                    for label, share in (("50", 0.5), ("95", 0.95), ("99", 0.99))
                },
                "max_ms": samples[-1],
            }
        pooled["p95_ratio"] = pooled["during"]["p95_ms"] / pooled["idle"]["p95_ms"]
        return {
            "settings": {
                "upstream_latency_ms": LATENCY_MS,
                "upstream_jitter_ms": JITTER_MS,
                "quotas": "the sandbox's defaults (the upstreams' real quotas per minute)",
                "rate_limits_per_minute": {name: s.rate_per_minute for name, s in settings.sources.items()},
                "burst": {name: s.burst for name, s in settings.sources.items()},
                "lookup_rate_limit": settings.lookup_rate_limit,
                "batch_concurrency": settings.batch_concurrency,
                "batch_token_reserve": settings.batch_token_reserve,
                "batch_source_wait": settings.batch_source_wait,
                "batch_poll_interval": settings.batch_poll_interval,
                "worker_concurrency": settings.worker_concurrency,
                "web_workers": settings.web_workers,
                "interactive_type": "cep",
                "lookups_per_phase": arguments.lookups,
                "rate_per_second": arguments.rate,
                "batch_rows": arguments.rows,
                "repeats": arguments.repeats,
            },
            "runs": runs,
            "pooled": pooled,
            "summary": {
                **{
                    f"{phase}_{key}": spread([r[phase]["lookups"][key] for r in runs])
                    for phase in ("idle", "during")
                    for key in ("p50_ms", "p95_ms", "p99_ms")
                },
                "p95_ratio": spread([r["p95_ratio"] for r in runs]),
                "batch_items_per_second": spread([r["during"]["batch"]["items_per_second"] for r in runs]),
                "batch_done_in_window": spread([r["during"]["batch"]["done_in_window"] for r in runs]),
                "batch_post_ms": spread([r["during"]["batch"]["post_ms"] for r in runs]),
            },
            "goals": {"p95_ratio": GOAL_RATIO},
        }

    return run


def markdown(report: dict) -> str:
    s, settings, pooled = report["summary"], report["settings"], report["pooled"]
    ratio = pooled["p95_ratio"]
    met = "yes" if ratio <= GOAL_RATIO else "**no**"
    limits = ", ".join(
        f"{name} {fmt(float(rate), 2)}" for name, rate in settings["rate_limits_per_minute"].items()
    )
    runs = report["runs"]
    calls = {
        name: sum(r["during"]["upstream_calls_in_window"][name]["requests"] for r in runs)
        for name in UPSTREAMS
    }
    refused = sum(
        r[phase]["upstream_calls_in_window"][name]["over_quota"]
        for r in runs
        for phase in ("idle", "during")
        for name in UPSTREAMS
    )
    window = sum(r["during"]["batch"]["window_seconds"] for r in runs)
    call_rates = ", ".join(f"{name} {calls[name] / window:.1f}" for name in UPSTREAMS)
    return (
        harness.header(
            report, "Interactive lookups during a bulk batch (`bench/batch_interference.py`, issue 7)"
        )
        + f"""
The real deployment: the project's web command ({settings["web_workers"]} gevent workers), one worker node (threads pool,
{settings["worker_concurrency"]} threads), embedded Valkey, the sandbox with the upstreams' real quotas (its defaults) and every
upstream answering in {LATENCY_MS} ± {JITTER_MS} ms (uniform); the service's default source rate limits (per minute: {limits};
burst 1) and batch settings (BATCH_CONCURRENCY {settings["batch_concurrency"]}, BATCH_TOKEN_RESERVE
{settings["batch_token_reserve"]}, BATCH_SOURCE_WAIT {fmt(settings["batch_source_wait"])} s); the per-client limit off (the lookups stand for
many people, all on 127.0.0.1 here). Each repeat: {settings["lookups_per_phase"]} interactive lookups of fresh CEPs at
{fmt(settings["rate_per_second"])}/s (`bench/http_load.py`, open loop, its own process), timed from the POST to `complete` on
the lookup's event stream, first on an idle service, then while a batch of {settings["batch_rows"]:,} fresh rows
(CNPJs and CEPs alternating) runs; the batch is cancelled after the window. CEPs because ReceitaWS's real quota (3 a
minute) keeps a company lookup from completing at a person's pace even on an idle service. {settings["repeats"]}
repeat(s); the percentiles are over all repeats' lookups together, each repeat's own in brackets (median, min–max).

| figure | idle | during the batch | ratio | goal | met |
|---|---|---|---|---|---|
| interactive p50 ms | {fmt(pooled["idle"]["p50_ms"])} ({cell(s["idle_p50_ms"])}) | {fmt(pooled["during"]["p50_ms"])} ({cell(s["during_p50_ms"])}) | | | |
| interactive p95 ms | {fmt(pooled["idle"]["p95_ms"])} ({cell(s["idle_p95_ms"])}) | {fmt(pooled["during"]["p95_ms"])} ({cell(s["during_p95_ms"])}) | {ratio:.2f} ({cell(s["p95_ratio"], 2)}) | ≤ {GOAL_RATIO:g} | {met} |
| interactive p99 ms | {fmt(pooled["idle"]["p99_ms"])} ({cell(s["idle_p99_ms"])}) | {fmt(pooled["during"]["p99_ms"])} ({cell(s["during_p99_ms"])}) | | | |
| interactive lookups timed | {pooled["idle"]["lookups"]} | {pooled["during"]["lookups"]} | | | |
| batch items done a second in the window | | {cell(s["batch_items_per_second"], 2)} | | | |
| batch items done in the window | | {cell(s["batch_done_in_window"], 0)} | | | |
| `POST /api/batches` of {settings["batch_rows"]:,} rows, ms | | {cell(s["batch_post_ms"], 0)} | | | |
| upstream calls a second in the window | | {call_rates} | | | |
| upstream answers refused over quota (429), all phases | {refused} | | | | |
"""
        + NOTES
    )


NOTES = """
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one repeat of 8 lookups at 2/s, 1,000 rows; rewrites nothing"
    )
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--lookups", type=int, help="interactive lookups per phase and repeat")
    parser.add_argument("--rate", type=float, help="interactive lookups a second")
    parser.add_argument("--rows", type=int, help="rows of each batch")
    arguments = parser.parse_args(argv)
    arguments.repeats = arguments.repeats or (1 if arguments.quick else 3)
    arguments.lookups = arguments.lookups or (8 if arguments.quick else 40)
    arguments.rate = arguments.rate or (2.0 if arguments.quick else 1.0)
    arguments.rows = arguments.rows or (1000 if arguments.quick else 10_000)
    if os.environ.get("BENCH_DEBUG"):
        log(f"arguments: {arguments}")
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
