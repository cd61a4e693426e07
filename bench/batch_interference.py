"""Benchmark of issue 7: interactive lookups while a large bulk batch runs, against the same lookups idle.

The real deployment (bench/deployment.py: gunicorn web, one Celery worker node, embedded Valkey,
the sandbox) with the default batch settings (BATCH_CONCURRENCY 8, BATCH_TOKEN_RESERVE 2); every
upstream answers in 100 ± 50 ms.  Two deployments: "real", the upstreams' real quotas (the
sandbox's defaults) and the service's default source rate limits, as the issue asks; "unlimited",
quotas and limits off as in the other lookup benchmarks, so the batch runs as fast as its
concurrency and the two cores allow.  The per-client limits are off in both: the lookups and
batches stand for many people, all of whom come from 127.0.0.1 here.

Each repeat: (a) idle, N interactive lookups of fresh CEPs at a fixed rate (bench/http_load.py,
open loop, its own process), each timed from sending `POST /api/lookups` to reading `complete` on
its event stream; (b) a batch of fresh CNPJs and CEPs posted to `/api/batches`, and once its items
flow, N more interactive lookups of other fresh CEPs the same way; then the batch is cancelled
and its items in flight finish before the next repeat.  Interactive lookups are CEPs because
ReceitaWS's real quota (3 a minute) keeps a company lookup from completing at a person's pace
even on an idle service.  Goal (issue 7): p95 during the batch at most twice the idle p95.

    .venv/bin/python -m bench.batch_interference           # both, 3 repeats of 40 lookups a phase at 1/s, 10,000 rows
    .venv/bin/python -m bench.batch_interference --quick   # "real", one repeat of 8 at 2/s, 1,000 rows (< 60 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
import threading
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench import harness
from bench.deployment import Service, http_load, service
from bench.harness import GENERATORS, cell, fmt, log, spread, wait_for
from bench.http_load import percentile
from bench.throughput import cpu_seconds
from devstack.embedded_redis import free_port
from enrich.settings import Settings

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


def worker_counters(deployed: Service) -> dict[str, float]:
    """The worker's task and rate-limit counters (its own /metrics): `task <name> <state>` and
    `delay <source> <reason>` (reserved, paced, exhausted) -> count so far."""
    url = f"http://127.0.0.1:{deployed.env['WORKER_METRICS_PORT']}/metrics"
    text = requests.get(url, timeout=5).text
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "enrich_tasks_total":
                counters[f"task {labels['task']} {labels['state']}"] = sample.value
            elif sample.name == "enrich_rate_limit_delays_total":
                counters[f"delay {labels['source']} {labels['reason']}"] = sample.value
    return counters


def counters_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {
        key: after[key] - before.get(key, 0.0) for key in sorted(after) if after[key] != before.get(key, 0.0)
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
    counters_before = worker_counters(deployed)
    window_began = time.time()
    with StatusSampler(web) as sampler:
        lookups = interactive(deployed, tmp, identifiers, arguments)
    window = time.time() - window_began
    after, calls_after, cpu_after = _get(status_url), sandbox_counts(deployed), cpu_seconds(processes)
    counters = counters_delta(worker_counters(deployed), counters_before)
    cancelled = requests.delete(status_url, headers={"X-Cancel-Token": batch["cancel_token"]}, timeout=30)
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
        "worker_counters_in_window": counters,
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


# Each scenario is its own deployment.  "real": as the issue asks (the upstreams' quotas, the
# service's default limits): the batch goes at the pace the limits leave it.  "unlimited": quotas
# and limits off, as in the other lookup benchmarks: the batch goes as fast as BATCH_CONCURRENCY
# and the two cores let it, so it competes for CPU, threads and the broker instead of tokens.
SCENARIOS = {"real": True, "unlimited": False}
LABELS = {
    "real": "real (real quotas, default limits)",
    "unlimited": "unlimited (quotas and limits off)",
}


def scenario(tmp: Path, processes: harness.Processes, arguments, real_limits: bool) -> dict:
    """Repeats of (idle lookups, a batch with the same number of lookups during it) on one deployment."""
    # The per-client limits are off: the lookups and batches stand for many people, all on 127.0.0.1.
    extra = {"WORKER_METRICS_PORT": str(free_port()), "BATCH_RATE_LIMIT": "off"}
    runs = []
    with service(
        tmp, processes, sandbox_latency_ms=LATENCY_MS, real_limits=real_limits, extra_env=extra
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
            counters_before = worker_counters(deployed)
            began = time.time()
            with StatusSampler(deployed.web_url) as sampler:
                idle = interactive(deployed, tmp, fresh(arguments.lookups), arguments)
            cpu_after = cpu_seconds(processes)
            idle_run = {
                "lookups": idle,
                "window_seconds": round(time.time() - began, 2),
                "upstream_calls_in_window": counts_delta(sandbox_counts(deployed), calls_before),
                "worker_counters_in_window": counters_delta(worker_counters(deployed), counters_before),
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
                f"{'real' if real_limits else 'unlimited'} repeat {repeat + 1}: idle p50/p95 "
                f"{idle['p50_ms']:.0f}/{idle['p95_ms']:.0f} ms, during {during['lookups']['p50_ms']:.0f}/"
                f"{during['lookups']['p95_ms']:.0f} ms (ratio {ratio:.2f}); batch "
                f"{during['batch']['items_per_second']:.1f} items/s, {during['batch']['done_in_window']} done"
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

    def cpu_share(phase: str, name: str) -> list[float]:
        """CPU time of one process tree per second of the phase (1.0 = one core busy)."""
        return [
            r[phase]["cpu_seconds_in_window"].get(name, 0.0)
            / r[phase].get("window_seconds", r[phase].get("batch", {}).get("window_seconds", 1))
            for r in runs
        ]

    return {
        "settings": {
            "real_limits": real_limits,
            "quotas": "the sandbox's defaults (the upstreams' real quotas)" if real_limits else "off",
            "rate_limits_per_minute": {name: s.rate_per_minute for name, s in settings.sources.items()},
            "burst": {name: s.burst for name, s in settings.sources.items()},
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
            "batch_rate_limit_per_second": spread(
                [r["during"]["batch"]["rate_limit_per_second"] for r in runs]
            ),
            **{
                f"{phase}_{name}_cpu_share": spread(cpu_share(phase, name))
                for phase in ("idle", "during")
                for name in ("web", "worker", "sandbox")
            },
        },
    }


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: harness.Processes) -> dict:
        scenarios = {}
        for name in arguments.scenarios:
            (tmp / name).mkdir()
            scenarios[name] = scenario(tmp / name, processes, arguments, SCENARIOS[name])
        defaults = Settings.from_env({})
        return {
            "settings": {
                "upstream_latency_ms": LATENCY_MS,
                "upstream_jitter_ms": JITTER_MS,
                "lookup_rate_limit": "off",
                "batch_rate_limit": "off",
                "batch_concurrency": defaults.batch_concurrency,
                "batch_token_reserve": defaults.batch_token_reserve,
                "batch_source_wait": defaults.batch_source_wait,
                "batch_poll_interval": defaults.batch_poll_interval,
                "worker_concurrency": defaults.worker_concurrency,
                "web_workers": defaults.web_workers,
                "interactive_type": "cep",
                "lookups_per_phase": arguments.lookups,
                "rate_per_second": arguments.rate,
                "batch_rows": arguments.rows,
                "repeats": arguments.repeats,
            },
            "scenarios": scenarios,
            "goals": {"p95_ratio": GOAL_RATIO},
        }

    return run


def _call_rates(runs: list[dict]) -> str:
    window = sum(r["during"]["batch"]["window_seconds"] for r in runs)
    calls = {
        name: sum(r["during"]["upstream_calls_in_window"][name]["requests"] for r in runs)
        for name in UPSTREAMS
    }
    return ", ".join(f"{name} {calls[name] / window:.1f}" for name in UPSTREAMS)


def _refused(runs: list[dict]) -> int:
    return sum(
        r[phase]["upstream_calls_in_window"][name]["over_quota"]
        for r in runs
        for phase in ("idle", "during")
        for name in UPSTREAMS
    )


def _description(settings: dict, limits: str) -> str:
    """The method, as one paragraph wrapped like the rest of docs/benchmarks.md."""
    text = (
        f"The project's web command ({settings['web_workers']} gevent workers), one worker node (threads pool, "
        f"{settings['worker_concurrency']} threads), embedded Valkey and the sandbox, every upstream answering in "
        f"{LATENCY_MS} ± {JITTER_MS} ms (uniform); the default batch settings (BATCH_CONCURRENCY "
        f"{settings['batch_concurrency']}, BATCH_TOKEN_RESERVE {settings['batch_token_reserve']}, BATCH_SOURCE_WAIT "
        f"{fmt(settings['batch_source_wait'])} s, BATCH_POLL_INTERVAL {fmt(settings['batch_poll_interval'])} s); "
        "the per-client limits off (the lookups and batches stand for many people, all on 127.0.0.1 here). Two "
        "deployments: *real*, the issue's case, the sandbox with the upstreams' real quotas (its defaults) and the "
        f"service's default source limits (per minute: {limits}; burst 1); *unlimited*, quotas and limits off as in "
        "the other lookup benchmarks, so the batch runs as fast as its concurrency and the two cores let it. Each "
        f"repeat: {settings['lookups_per_phase']} interactive lookups of fresh CEPs at "
        f"{fmt(settings['rate_per_second'])}/s (`bench/http_load.py`, open loop, its own process), each timed from "
        "the POST to `complete` on its event stream, first on the idle service, then while a batch of "
        f"{settings['batch_rows']:,} fresh rows (CNPJs and CEPs alternating) runs, from once its first "
        f"{settings['batch_concurrency']} items are done; the batch is cancelled after that window and its items in "
        "flight finish before the next repeat. Interactive lookups are CEPs because ReceitaWS's real quota (3 a "
        "minute) keeps a company lookup from completing at a person's pace even on an idle service. "
        f"{settings['repeats']} repeat(s) per deployment; percentiles over all repeats' lookups together, each "
        "repeat's own p95 beside them (median, min–max)."
    )
    return textwrap.fill(text, 115, break_on_hyphens=False)


def markdown(report: dict) -> str:
    settings = report["settings"]
    percentiles, batches = [], []
    for name, result in report["scenarios"].items():
        s, pooled = result["summary"], result["pooled"]
        ratio = pooled["p95_ratio"]
        idle, during = pooled["idle"], pooled["during"]
        percentiles.append(
            f"| {LABELS[name]} | {fmt(idle['p50_ms'])} / {fmt(idle['p95_ms'])} / {fmt(idle['p99_ms'])} | "
            f"{fmt(during['p50_ms'])} / {fmt(during['p95_ms'])} / {fmt(during['p99_ms'])} | "
            f"{cell(s['idle_p95_ms'])} → {cell(s['during_p95_ms'])} | **{ratio:.2f}** "
            f"({cell(s['p95_ratio'], 2)}) | ≤ {GOAL_RATIO:g} | {'yes' if ratio <= GOAL_RATIO else '**no**'} |"
        )
        cpu = " / ".join(
            f"{cell(s[f'idle_{part}_cpu_share'], 2)} → {cell(s[f'during_{part}_cpu_share'], 2)}"
            for part in ("web", "worker")
        )
        pace = (
            cell(s["batch_rate_limit_per_second"], 2) if result["settings"]["real_limits"] else "(no limits)"
        )
        batches.append(
            f"| {LABELS[name]} | {cell(s['batch_items_per_second'], 2)} | {cell(s['batch_done_in_window'], 0)} | "
            f"{pace} | {_call_rates(result['runs'])} | {cpu} | {cell(s['batch_post_ms'], 0)} | "
            f"{_refused(result['runs'])} |"
        )
    real = report["scenarios"].get("real")
    limits = (
        ", ".join(
            f"{name} {fmt(float(rate), 2)}"
            for name, rate in real["settings"]["rate_limits_per_minute"].items()
        )
        if real
        else "n/a"
    )
    return (
        harness.header(
            report, "Interactive lookups during a bulk batch (`bench/batch_interference.py`, issue 7)"
        )
        + f"""
{_description(settings, limits)}

| deployment | idle p50 / p95 / p99 ms | during the batch p50 / p95 / p99 ms | p95 per repeat, idle → during | p95 ratio (per repeat) | goal | met |
|---|---|---|---|---|---|---|
{chr(10).join(percentiles)}

| deployment | batch items done/s in the window | items done in the window | the batch's rate-limit pace, items/s | upstream calls/s in the window | CPU cores busy, idle → during: web / worker | `POST /api/batches` ms ({settings["batch_rows"]:,} rows) | answers refused over quota (429), all phases |
|---|---|---|---|---|---|---|---|
{chr(10).join(batches)}
"""
        + NOTES
    )


NOTES = """
Why the goal is met (figures of the run above): a batch keeps at most BATCH_CONCURRENCY items in flight and its
tasks sit at the broker's lowest level, so the worker's threads and the broker always had room for interactive
work (at most 2 messages waiting in the once-a-second samples of `/api/status`); and a batch call takes a token only
while more than BATCH_TOKEN_RESERVE would remain, so an interactive CEP found BrasilAPI's and ViaCEP's tokens at once
(their buckets never fell below 1.1 tokens in those samples, and the slowest interactive lookups' sources all went
out on their first attempt, none waiting for a token). The limiter kept every upstream
under its quota throughout (no 429). With the defaults the batch leaves the CPU mostly idle (the worker at 0.16 and
0.26 of a core); with `BATCH_CONCURRENCY=32` and `128` (quota-free, one quick-mode repeat of 40 lookups each, not
kept) it did 55 and 69 items/s with the worker at 0.66 and 0.87 of a core, and the p95 ratio was 1.10 and 1.21: the
claim still holds when the batch keeps a core busy.

What the batch itself gets under the real limits: 5.8 items/s, 0.92 of the pace its own rate limits allow (6.33
items/s, what its ETA assumes until it has measured a pace), with BrasilAPI (which nearly every item needs: a
CEP's first source, a company's first source, and the first CEP source a company's cross-check tries) at 7.9 calls/s
of its 9.5/s. It got there in two changes made after this benchmark's first runs, both in rate_limiter.py. (1) At
first the batch got 3.5 items/s (0.56 of its pace; BrasilAPI at 5.6 calls/s, about 8 `fetch_source` re-checks an
item): a held batch call asks again once a deferred-dispatcher round (DEFERRED_POLL_INTERVAL, 0.2 s), and a bucket
of burst 1 + reserve 2 tokens overflowed between rounds, so about one batch call per source and round got a token.
The bucket now also has room for one round's refill above the reserve (rate × 0.2 s: 2 tokens for BrasilAPI and
ViaCEP, 1 for OpenCNPJ, none for ReceitaWS). That alone raised the batch to 6.0 items/s but the p95 ratio to 1.22
(163 → 196 ms, run `batch_interference-20261201T123424Z.json`): the slowest interactive lookups' BrasilAPI calls had
their token at once but were *paced*, because the batch now filled BrasilAPI's log of starts (11 a second) and a
person's call waited for the next second. (2) So the reserve now holds in the log of starts too: a batch call starts
only while BATCH_TOKEN_RESERVE more starts would still fit in the second and the minute. Together: 5.8 items/s and a
ratio of 1.00, the batch's calls paced instead of the person's (some 100–175 `paced` delays of BrasilAPI batch calls
a window, each keeping its token), about 3.5 `fetch_source` tasks an item. Still open: the dispatcher could sleep
only until its next due entry when that comes before its interval, and a held batch call could wait in its batch's
step rather than as a task per re-check.

Not measured: a lookup that reaches a web worker while that worker parses and stores a 10,000-row batch (its
`POST /api/batches` took 0.3–0.35 s); the window starts once the batch's first items are done. The floor of an
interactive CEP is the slower of two 50–150 ms upstream draws (121 ms median, 148 ms p95), so the service's own
part is about 15–20 ms at the median and at p95, idle or not. Earlier full runs the same day: 0.97 for the real
deployment alone at a load of 0.5 (`bench/results/batch_interference-20261201T115545Z.json`, an earlier layout of
the report), and 1.06 (real) and 1.03 (unlimited) while other sessions' tests shared the two cores at a load of
2.6 (`bench/results/batch_interference-20261201T120451Z.json`).
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
    parser.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="run only this deployment (repeatable)"
    )
    parser.add_argument("--render", metavar="JSON", help="only rewrite the doc section from a saved full run")
    arguments = parser.parse_args(argv)
    if arguments.render:
        return harness.render(NAME, arguments.render, markdown)
    arguments.repeats = arguments.repeats or (1 if arguments.quick else 3)
    arguments.lookups = arguments.lookups or (8 if arguments.quick else 40)
    arguments.rate = arguments.rate or (2.0 if arguments.quick else 1.0)
    arguments.rows = arguments.rows or (1000 if arguments.quick else 10_000)
    arguments.scenarios = arguments.scenario or (["real"] if arguments.quick else list(SCENARIOS))
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
