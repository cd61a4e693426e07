"""Benchmark 1: a cached lookup (`POST /api/lookups` answered from the cache) against `GET /healthz`.

Both on the same server: the project's web command (launcher.commands: gunicorn gevent, WEB_WORKERS
workers) with the per-client limit off, after one real lookup through the service (sandbox, worker)
has filled the cache for the company and its CEP.  Beside it, with the same gunicorn command line
and started once for the run: the floor (bench/baselines/floor_app.py, the least a cached answer
must do, with the real answer's headers and size) and the service again with the default per-client
limit.  Full speed: wrk (bench/wrk.py, C, 1 thread, 32 connections) in short slices that alternate
healthz, cached, floor and default limit.  Then the cached lookup at a fixed rate of half its own
peak, where its p99 is judged, with bench/http_load.py (wrk cannot pace a fixed rate).  Goals
(issue 5): cached throughput at least 0.6 of healthz's; p99 under 10 ms at half of peak.

wrk counts only answers of 400 and above, so whether the cached lookup is answered from the cache
(200, `cached: true`) and not started again (202) is checked by POSTs sampled around each of its
slices, and counted by the service's own `enrich_lookups_total{outcome="cached"}`.

    .venv/bin/python -m bench.cached_lookup            # 3 repeats of 8 s per side; rewrites its docs section
    .venv/bin/python -m bench.cached_lookup --quick    # one repeat of 4 s per side (< 90 s); rewrites nothing
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import requests

from bench import harness, wrk
from bench.deployment import http_load, service, start_web
from bench.harness import cell, log, spread, wait_for

NAME = "cached_lookup"
IDENTIFIER = "11222333000181"  # one hot company: every request reads the same cached entries
GOAL_RATIO = 0.6
GOAL_P99_HALF_MS = 10.0
SAMPLES = 3  # POSTs sampled before and after each slice of the cached lookup
SIDES = ("healthz", "cached", "floor", "limited")  # the order of each round of slices
FLOOR_APP = "bench.baselines.floor_app:create_app()"
PAYLOAD = json.dumps({"identifier": IDENTIFIER})
JSON = {"Content-Type": "application/json"}
HOP_HEADERS = {"date", "server", "connection", "content-length", "transfer-encoding"}  # gunicorn's own
CACHED_COUNTER = re.compile(r'^enrich_lookups_total\{[^}]*outcome="cached"[^}]*\} (\S+)$', re.M)


def warm(web_url: str) -> None:
    """One lookup through the real service, then wait until a POST is answered from the cache."""
    created = requests.post(
        f"{web_url}/api/lookups", json={"identifier": IDENTIFIER, "refresh": True}, timeout=10
    )
    created.raise_for_status()

    def cached() -> bool:
        answer = requests.post(f"{web_url}/api/lookups", json={"identifier": IDENTIFIER}, timeout=10)
        return answer.status_code == 200 and answer.json().get("cached") is True

    wait_for(cached, 60, "the cache to be warm")


def sample(session: requests.Session, url: str, count: int) -> list[dict]:
    """`count` POSTs of the hot identifier: each one's status and whether it says `cached: true`."""
    found = []
    for _ in range(count):
        answer = session.post(url, data=PAYLOAD, headers=JSON, timeout=10)
        try:
            cached = answer.status_code == 200 and answer.json().get("cached") is True
        except ValueError:
            cached = False
        found.append({"status": answer.status_code, "cached": cached})
    return found


def cached_answers(web_url: str) -> float | None:
    """The service's count of lookups answered from the cache (all its workers), None if not exported."""
    found = CACHED_COUNTER.findall(requests.get(f"{web_url}/metrics", timeout=10).text)
    return sum(float(value) for value in found) if found else None


def floor_answer(tmp: Path, web_url: str) -> tuple[Path, requests.Response]:
    """One real cached answer, written as the floor app's FLOOR_ANSWER file; the file and the answer."""
    answer = requests.post(f"{web_url}/api/lookups", data=PAYLOAD, headers=JSON, timeout=10)
    if answer.status_code != 200 or answer.json().get("cached") is not True:
        raise RuntimeError(f"expected a cached answer for the floor, got {answer.status_code}")
    headers = [[name, value] for name, value in answer.headers.items() if name.lower() not in HOP_HEADERS]
    path = tmp / "floor-answer.json"
    path.write_text(json.dumps({"identifier": IDENTIFIER, "headers": headers, "body": answer.text}))
    return path, answer


def wire_size(answer: requests.Response) -> int:
    """Bytes of an answer's header lines (name: value) and body, as far as requests shows them."""
    return sum(len(name) + len(value) + 4 for name, value in answer.headers.items()) + len(answer.content)


def check_floor(floor_url: str, real: requests.Response) -> int:
    """The floor answers with the real answer's header names and size; returns that size."""
    answer = requests.post(f"{floor_url}/api/lookups", data=PAYLOAD, headers=JSON, timeout=10)
    names = sorted(name.lower() for name in answer.headers)
    if (
        answer.status_code != 200
        or names != sorted(name.lower() for name in real.headers)
        or wire_size(answer) != wire_size(real)
    ):
        raise RuntimeError(
            f"the floor's answer differs from the real one: {answer.status_code} {dict(answer.headers)} "
            f"{len(answer.content)} bytes, against {dict(real.headers)} {len(real.content)} bytes"
        )
    return wire_size(answer)


def wrk_version() -> str:
    if shutil.which("wrk") is None:
        raise wrk.WrkMissing("wrk is not installed (Debian's package `wrk`): run `make wrk`")
    shown = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (shown.stdout or shown.stderr).splitlines()[0].split(" Copyright")[0].strip()


def pooled(parts: list[dict]) -> dict:
    """One summary of several wrk slices: throughput over their total time, the median of their
    p50s and the highest of their p99s (wrk gives percentiles per run, which cannot be pooled)."""
    answered, seconds = sum(p["requests"] for p in parts), sum(p["seconds"] for p in parts)
    socket_errors = {name: sum(p["socket_errors"][name] for p in parts) for name in parts[0]["socket_errors"]}
    return {
        "requests": answered,
        "seconds": round(seconds, 3),
        "rps": round(answered / seconds, 2),
        "cycle_ms": round(parts[0]["connections"] * seconds * 1000 / answered, 3),
        "p50_ms": statistics.median(p["p50_ms"] for p in parts),
        "p99_ms": max(p["p99_ms"] for p in parts),
        "max_ms": max(p["max_ms"] for p in parts),
        "answers_4xx_5xx": sum(p["answers_4xx_5xx"] for p in parts),
        "socket_errors": socket_errors,
        "socket_errors_total": sum(socket_errors.values()),
        "slices": parts,
    }


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: harness.Processes) -> dict:
        runs = []
        load_generator = wrk_version()  # before anything starts: without wrk there is nothing to run
        with service(tmp, processes, sandbox_latency_ms=0) as deployed:
            warm(deployed.web_url)
            answer_file, real = floor_answer(tmp, deployed.web_url)
            # Two more web servers, started once and idle while the others are measured (cheaper than
            # restarting the service's web process with another limit before every slice of it).
            floor = start_web(
                processes, deployed, "floor", app=FLOOR_APP, env={"FLOOR_ANSWER": str(answer_file)}
            )
            limited = start_web(processes, deployed, "limited", env={"LOOKUP_RATE_LIMIT": None})
            answer_bytes = check_floor(floor.web_url, real)
            lookup = f"{deployed.web_url}/api/lookups"
            post = {"method": "POST", "body": PAYLOAD, "headers": JSON}
            targets = {
                "healthz": (f"{deployed.web_url}/healthz", {}),
                "cached": (lookup, post),
                "floor": (f"{floor.web_url}/api/lookups", post),
                "limited": (f"{limited.web_url}/api/lookups", post),
            }
            slice_seconds = arguments.seconds // arguments.slices
            for url, options in targets.values():  # warm-up: connections, near caches, the limit's count
                wrk.run(url, 1, arguments.connections, tmp=tmp, **options)
            session = requests.Session()
            for repeat in range(arguments.repeats):
                # The sides alternate in short slices, so that other work on the machine, which comes
                # and goes, weighs on all of them alike.
                slices: dict[str, list[dict]] = {side: [] for side in SIDES}
                samples: list[dict] = []
                limited_samples: list[dict] = []
                counted: float | None = 0.0
                for _ in range(arguments.slices):
                    for side in SIDES:
                        url, options = targets[side]
                        if side == "cached":
                            samples += sample(session, lookup, SAMPLES)
                            before = cached_answers(deployed.web_url)
                        figures = wrk.run(url, slice_seconds, arguments.connections, tmp=tmp, **options)
                        if side == "cached":
                            after = cached_answers(deployed.web_url)
                            if counted is not None and before is not None and after is not None:
                                counted += after - before
                            else:
                                counted = None  # the service does not export the counter
                            samples += sample(session, lookup, SAMPLES)
                        elif side == "limited":
                            limited_samples += sample(session, targets["limited"][0], SAMPLES)
                        slices[side].append(figures)
                sides = {side: pooled(parts) for side, parts in slices.items()}
                for side in ("healthz", "cached", "floor"):
                    if sides[side]["answers_4xx_5xx"]:
                        raise RuntimeError(f"{side}: answers of 400 and above at full speed: {sides[side]}")
                cached = sides["cached"]
                # A cache read that fails (Redis slower than its socket timeout) is a miss: a 202.
                # Reported as a figure; only a cache that does not answer at all stops the run.
                from_cache = sum(1 for s in samples if s["cached"])
                if from_cache < 0.5 * len(samples):
                    raise RuntimeError(f"lookups not answered from the cache: sampled {samples}")
                cached["sampled"] = {
                    "samples": len(samples),
                    "cached": from_cache,
                    "statuses": statuses(samples),
                }
                cached["not_from_cache_share_sampled"] = round(1 - from_cache / len(samples), 4)
                # Requests still in flight when wrk stops are answered (and counted) but not in wrk's
                # figure: the counted share can hide up to `connections` per slice.
                cached["counted_cached"] = counted
                cached["not_from_cache_share_counted"] = (
                    None if counted is None else round(max(0.0, 1 - counted / cached["requests"]), 4)
                )
                limited_side = sides["limited"]
                limited_side["share_4xx_5xx"] = round(
                    limited_side["answers_4xx_5xx"] / limited_side["requests"], 4
                )
                limited_side["sampled_statuses"] = statuses(limited_samples)
                half = http_load(
                    lookup,
                    tmp,
                    method="POST",
                    body=PAYLOAD,
                    rate=cached["rps"] / 2,
                    connections=arguments.connections,
                    seconds=arguments.seconds,
                )
                half["kept_up"] = not half["failed"] and half["rps"] >= 0.95 * half["rate"]
                ratios = {
                    "cached_healthz": cached["rps"] / sides["healthz"]["rps"],
                    "floor_healthz": sides["floor"]["rps"] / sides["healthz"]["rps"],
                    "cached_floor": cached["rps"] / sides["floor"]["rps"],
                }
                log(
                    f"repeat {repeat + 1}: healthz {sides['healthz']['rps']:.0f}/s, cached {cached['rps']:.0f}/s, "
                    f"floor {sides['floor']['rps']:.0f}/s (cached/healthz {ratios['cached_healthz']:.3f}, "
                    f"floor/healthz {ratios['floor_healthz']:.3f}, cached/floor {ratios['cached_floor']:.3f}); "
                    f"default limit {limited_side['rps']:.0f}/s, {limited_side['share_4xx_5xx']:.1%} >= 400 "
                    f"(sampled {limited_side['sampled_statuses']}); p99 at {half['rate']:.0f}/s: "
                    f"{half['p99_ms']:.2f} ms ({half['rps']:.0f}/s reached)"
                )
                runs.append({**sides, "cached_half_load": half, "ratios": ratios})
        return {
            "settings": {
                "identifier": IDENTIFIER,
                "load_generator": load_generator,
                "threads": 1,
                "connections": arguments.connections,
                "seconds": arguments.seconds,
                "slices": arguments.slices,
                "repeats": arguments.repeats,
                "samples_per_slice": 2 * SAMPLES,
                "web_workers": deployed.settings.web_workers,
                "default_lookup_rate_limit": limited.settings.lookup_rate_limit,
                "answer_bytes": answer_bytes,
                "answer_body_bytes": len(real.content),
            },
            "runs": runs,
            "summary": summary(runs),
            "goals": {"ratio": GOAL_RATIO, "half_p99_ms": GOAL_P99_HALF_MS},
        }

    return run


def statuses(samples: list[dict]) -> dict[str, int]:
    """How many of the sampled answers had each status."""
    return added([{str(found["status"]): 1} for found in samples])


def added(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, count in part.items():
            total[key] = total.get(key, 0) + count
    return dict(sorted(total.items()))


def summary(runs: list[dict]) -> dict:
    figures = {
        f"{side}_{figure}": spread([r[side][figure] for r in runs])
        for side in ("healthz", "cached", "floor", "limited")
        for figure in ("rps", "cycle_ms", "p50_ms", "p99_ms")
    }
    return {
        **figures,
        **{ratio: spread([r["ratios"][ratio] for r in runs]) for ratio in runs[0]["ratios"]},
        "socket_errors": sum(r[side]["socket_errors_total"] for r in runs for side in SIDES),
        "not_from_cache_share_sampled": spread([r["cached"]["not_from_cache_share_sampled"] for r in runs]),
        "not_from_cache_share_counted": spread([r["cached"]["not_from_cache_share_counted"] for r in runs]),
        "samples": sum(r["cached"]["sampled"]["samples"] for r in runs),
        "limited_share_4xx_5xx": spread([r["limited"]["share_4xx_5xx"] for r in runs]),
        "limited_sampled_statuses": added([r["limited"]["sampled_statuses"] for r in runs]),
        "half_rate": spread([r["cached_half_load"]["rate"] for r in runs]),
        "half_rps": spread([r["cached_half_load"]["rps"] for r in runs]),
        "half_p50_ms": spread([r["cached_half_load"]["p50_ms"] for r in runs]),
        "half_p99_ms": spread([r["cached_half_load"]["p99_ms"] for r in runs]),
        "half_kept_up": all(r["cached_half_load"]["kept_up"] for r in runs),
    }


def markdown(report: dict) -> str:
    s, settings = report["summary"], report["settings"]
    ratio = s["cached_healthz"]["median"]
    ratio_met = "yes" if ratio >= GOAL_RATIO else f"**no** ({ratio / GOAL_RATIO:.0%} of the goal)"
    p99_met = "yes" if s["half_p99_ms"]["median"] < GOAL_P99_HALF_MS else "**no**"
    kept_up = (
        "it kept up"
        if s["half_kept_up"]
        else "**it fell short of the rate in at least one repeat: the latency is not at that rate**"
    )
    sampled = ", ".join(f"{status} × {count}" for status, count in s["limited_sampled_statuses"].items())

    def latency(side: str) -> str:
        return f"{cell(s[f'{side}_p50_ms'], 2)} / {cell(s[f'{side}_p99_ms'], 2)}"

    return (
        harness.header(report, "Cached lookup against healthz (`bench/cached_lookup.py`)")
        + f"""
The project's web command (gunicorn gevent, {settings["web_workers"]} workers, `LOOKUP_RATE_LIMIT=off`) serves
`POST /api/lookups` for one company whose three sources and CEP were cached by a real lookup, and `GET /healthz`.
Beside it, started once for the run with the same gunicorn command line: the **floor**
(`bench/baselines/floor_app.py`: parse the JSON body, one dict read of pre-encoded bytes, returned with the real
cached answer's headers, {settings["answer_bytes"]:,} bytes of header lines and body like it), and the service again
with the **default per-client limit** (`LOOKUP_RATE_LIMIT` unset: {settings["default_lookup_rate_limit"]}). Full
speed: `{settings["load_generator"]}`, 1 thread, {settings["connections"]} keep-alive connections, on the same cores as
the servers; {settings["seconds"]:g} s per side and repeat in {settings["slices"]} slices that alternate healthz, cached,
floor and default limit (other work on the machine weighs on all alike). At full speed the time per request is
each connection's average (Little's law, exact); wrk's percentiles include the synthetic samples of its
coordinated-omission correction (an answer slower than twice that average adds samples for the requests a steady
client would have sent meanwhile: with stalls they are far above per-request percentiles), p50 the median of the
slices' p50s and p99 the highest of their p99s (wrk gives them per run). "Half of peak": `bench/http_load.py`
(wrk cannot pace a fixed rate) at half the cached lookup's full-speed throughput, latency counted from each
request's due time. Median of {settings["repeats"]} repeat(s) (min–max).

| at full speed (wrk) | healthz | cached lookup | floor |
|---|---|---|---|
| requests/s | {cell(s["healthz_rps"])} | {cell(s["cached_rps"])} | {cell(s["floor_rps"])} |
| ms per request and connection (connections × time ÷ answers) | {cell(s["healthz_cycle_ms"], 2)} | {cell(s["cached_cycle_ms"], 2)} | {cell(s["floor_cycle_ms"], 2)} |
| wrk's p50 / p99 ms (coordinated-omission corrected) | {latency("healthz")} | {latency("cached")} | {latency("floor")} |

| figure | value | goal | met |
|---|---|---|---|
| cached / healthz, requests/s | {cell(s["cached_healthz"], 3)} | ≥ {GOAL_RATIO} | {ratio_met} |
| floor / healthz, requests/s | {cell(s["floor_healthz"], 3)} | | |
| cached / floor, requests/s | {cell(s["cached_floor"], 3)} | | |
| cached lookups answered other than 200 `cached: true`, share of the {s["samples"]} POSTs sampled around its slices | {cell(s["not_from_cache_share_sampled"], 3)} | 0 | |
| cached lookups at full speed not counted as cached by the service (`enrich_lookups_total{{outcome="cached"}}` against wrk's answers) | {cell(s["not_from_cache_share_counted"], 3)} | 0 | |
| cached lookup p50 / p99 ms at half of peak ({cell(s["half_rps"])} requests/s reached; {kept_up}) | {cell(s["half_p50_ms"], 2)} / {cell(s["half_p99_ms"], 2)} | p99 < {GOAL_P99_HALF_MS:g} ms | {p99_met} |
| with the default per-client limit: requests/s of all answers at full speed | {cell(s["limited_rps"])} | | |
| with the default per-client limit: share answered 400 or above (sampled after each slice: {sampled}) | {cell(s["limited_share_4xx_5xx"], 3)} | | |
| wrk socket errors (connect, read, write, timeout), all sides | {s["socket_errors"]:,} | 0 | |
"""
        + NOTES.format(default=settings["default_lookup_rate_limit"], body=settings["answer_body_bytes"])
    )


# The first paragraph describes the cached path as it is on 2026-12-03 (HEAD a6768f9); whoever changes
# that path (a cached answer is to stop writing to Redis) updates it.  The rest is about the measurement.
NOTES = """
What a cached lookup does (2026-12-03, issue 17): it reads its sources' cache entries (from the process's near
cache, `near_cache.py`, when it holds them), merges them (a per-process memo keyed by the entries' versions), and
writes nothing to Redis: its id is sealed with AES-GCM and carries its creation time, priority and the digest of
the body it shares with every lookup answered from the same entries (`answer_ids.py`), which each process writes
or checks at most once a second; its count in the status history is kept per process and written about once a
second. The response is pre-encoded bytes spliced, never re-encoded. Before (issue 16's layout), each answer
was one Redis SET of its head, in a round trip with its status-history counters. A cached lookup answered 202 means its cache
read failed (a read that gives up is a miss) and it was fetched again: it shows under CPU starvation, where Redis
calls wait past their socket timeout.

The floor is what Flask and gunicorn themselves allow for an answer of this size on this machine: healthz answers
15 bytes of body, a cached lookup {body:,}, and sending and reading those bytes costs CPU on the same cores.
cached / healthz mixes the lookup's own work with the size of its answer. The floor sends the same headers and
bytes with none of the service's work, neither the lookup's nor the per-request work of the service's own
request hooks, which healthz pays too: cached / floor is all of that against the bare stack, and floor / healthz
is an upper bound of cached / healthz on this stack. wrk runs on the same two cores as the servers: its CPU per
request is far below the Python load generator's, but it still takes some from them.

With the default per-client limit every request comes from one client address, which that limit holds to
{default} lookups by design: past them, every answer is a 429 `rate_limited` with `Retry-After` (the count is
kept in Redis). That figure is how fast the service turns away one flooding client, not how fast it serves
lookups; the figure without the limit is the one for many clients, each within its limit. wrk counts answers of
400 and above without telling them apart: the sampled statuses show which they were. It is measured on a second
web server started with the default limit for the whole run (idle while the other sides run), which costs less
than restarting the service's web process before each of its slices.

wrk sees no 202: the cached lookup's check is the sampled POSTs (a few before and after each slice, the run
stops when fewer than half are answered from the cache) and the service's own counter of cached answers, which
also counts the requests still in flight when wrk stops (up to one per connection per slice), so its share can
hide that many.

Observability (issue 6: Prometheus counters in gunicorn's multiprocess files, the status page's 10 s
buckets written in the same round trip as the lookup, a log context per request) measured with
`bench/cpu_per_request.py` (web CPU per request at a fixed 600/s, which a noisy machine moves far
less than throughput) on one machine, before and after: cached 1.04 ms before (healthz 0.52), 1.18 ms
after (healthz 0.59 in the same runs: part of that is the machine). An INFO log line per cached answer
had cost about 0.3 ms more; cached answers are logged at DEBUG (their metric counts them).
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one repeat of 4 s per side (< 90 s); rewrites nothing"
    )
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seconds", type=int, help="seconds per side and repeat (whole, for wrk)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--slices", type=int, default=2, help="alternating slices of every side per repeat")
    arguments = parser.parse_args(argv)
    arguments.repeats = arguments.repeats or (1 if arguments.quick else 3)
    arguments.seconds = arguments.seconds or (4 if arguments.quick else 8)
    if arguments.seconds % arguments.slices:
        parser.error("--seconds must be a multiple of --slices: wrk runs whole seconds")
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
