"""Benchmark 6, rate-limit fidelity: one source at 20 requests/s, three worker nodes, 100 lookups/s offered.

Starts its own embedded Valkey, the sandbox (latency 0 ms, quotas off), the web server and three
Celery worker nodes with the service's own command lines and defaults; OpenCNPJ is limited to
RATE_LIMIT_OPENCNPJ=1200 per minute (20/s, burst 1), every other source and the per-client
limit are off.  This process POSTs unique CNPJ lookups at a steady 100/s (open loop, asyncio,
keep-alive connections) and meanwhile samples the OpenCNPJ bucket every 100 ms (negative tokens =
calls reserved ahead = a backlog) and the limiter's log of send slots.  The sandbox counts each
OpenCNPJ request when the kernel stamped its arrival (devstack.sandbox_worker), which its own CPU
starvation cannot bunch, and also when its handler ran (how it counted before); both come from its
`GET /_arrivals/opencnpj`.  The workers' `running` events of OpenCNPJ are read from the lookups'
event logs (their log ids are the Redis server's clock, in ms).

The instrument is calibrated in every run: a separate process sends exactly 20 requests/s on a
fixed schedule to the sandbox's `/_probe/<n>` path, over its own keep-alive connections, from
when the offer starts until the backlog is gone, so under the benchmark's own load.  Its own send
times against the sandbox's two counts of the same requests say whether the sandbox counts right.

    .venv/bin/python -m bench.rate_fidelity            # 30 s offered, observed until the backlog drains
    .venv/bin/python -m bench.rate_fidelity --quick    # 10 s offered, 10 s more observed (< 60 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import orjson
import requests
from flask import Flask

from app import close_app
from bench import harness
from bench.backlog import start_service_with
from bench.deployment import Service
from bench.harness import Processes, cell, fmt, log, spread
from enrich import redis_store
from enrich.services import services

NAME = "rate_fidelity"
SOURCE = "opencnpj"
LIMIT_PER_MINUTE = 1200


# -- load ---------------------------------------------------------------------------------------


async def _offer(host: str, port: int, identifiers: list[str], rate: float, connections: int) -> dict:
    """POST one lookup per identifier at `rate` per second, on schedule, over a connection pool."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(None)
    ids: list[str] = []
    errors: list[str] = []
    lateness: list[float] = []

    async def post(value: str) -> None:
        streams = await pool.get()
        body = b'{"identifier":"' + value.encode() + b'"}'
        request = (
            b"POST /api/lookups HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        try:
            if streams is None:
                streams = await asyncio.open_connection(host, port)
            reader, writer = streams
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length, location = 0, None
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, field = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(field)
                elif name.strip().lower() == "location":
                    location = field.strip()
            await reader.readexactly(length)
            if status in (200, 202) and location:
                ids.append(location.rsplit("/", 1)[1])
            else:
                errors.append(f"HTTP {status}")
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
            errors.append(repr(error))
            if streams is not None:
                streams[1].close()
            streams = None
        pool.put_nowait(streams)

    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = []
    for number, value in enumerate(identifiers):
        due = started + number / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lateness.append(max(0.0, loop.time() - due))
        tasks.append(asyncio.create_task(post(value)))
    await asyncio.gather(*tasks)
    return {"ids": ids, "errors": errors, "seconds": loop.time() - started, "max_lateness": max(lateness)}


# -- measurement --------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every 100 ms: the source's bucket tokens, and the limiter's log of send slots read whole."""

    def __init__(self, limiter, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.limiter, self.interval = limiter, interval
        self.samples: list[tuple[float, float]] = []  # (time, tokens)
        # The limiter's own log of send slots (Valkey's clock), read whole each time: it keeps the
        # last minute, so every slot is seen at least once.  A slot that leaves it early was given
        # back by a call whose thread ran too late for it (it took the next free one instead).
        self.log_key = redis_store.key(limiter.settings, "ratelimit", SOURCE, "starts")
        self.admitted: dict[bytes, float] = {}
        self.given_back: set[bytes] = set()
        self.stopping = threading.Event()

    def run(self) -> None:
        next_at = time.time()
        present: dict[bytes, float] = {}
        while not self.stopping.is_set():
            before = time.time()
            tokens = self.limiter.tokens(SOURCE)
            now = dict(self.limiter.redis.zrange(self.log_key, 0, -1, withscores=True))
            after = time.time()
            self.given_back.update(m for m, slot in present.items() if m not in now and slot > before - 59)
            present = now
            self.admitted.update(now)
            self.samples.append(((before + after) / 2, tokens))
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.time()))

    def slots(self) -> list[float]:
        """Every send slot seen and not given back, oldest first."""
        return sorted(slot for member, slot in self.admitted.items() if member not in self.given_back)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def per_second(times: list[float], start: float, end: float) -> list[int]:
    """Arrivals in each whole second from `start` until `end`."""
    counts = [0] * int(math.floor(end - start))
    for moment in times:
        index = int(math.floor(moment - start))
        if 0 <= index < len(counts):
            counts[index] += 1
    return counts


# -- the instrument's calibration ---------------------------------------------------------------


def _send_evenly(host: str, port: int, rate: float, start: float, stop, results) -> None:
    """In a process of its own: GET /_probe/<n> at start + n / rate, until `stop` is set.

    One thread keeps the schedule and never waits for an answer: each request goes out on a
    connection of its own, opened just before (the sandbox's keep-alive timeout would close idle
    ones under the sender), whose own thread reads the answer.  Records (n, when due, just before
    and just after its send); a request whose answer never came is left out of the comparison.
    """
    sent: list[tuple[int, float, float, float]] = []

    def read_answer(link: socket.socket) -> None:
        with contextlib.suppress(OSError), link, link.makefile("rb") as reader:
            reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            reader.read(length)

    number = 0
    while not stop.is_set():
        due = start + number / rate
        while (wait := due - time.time()) > 0:
            time.sleep(wait)
        try:
            link = socket.create_connection((host, port), timeout=60)
            before = time.time()
            link.sendall(
                f"GET /_probe/{number} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            sent.append((number, due, before, time.time()))
            threading.Thread(target=read_answer, args=(link,), daemon=True).start()
        except OSError:
            pass  # not sent: the sandbox never sees it either
        number += 1
    results.put(sent)


class PacedSender:
    """The calibration's evenly paced sender, a separate process (spawned, so no state is shared)."""

    def __init__(self, sandbox_url: str, rate: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.stopping, self.results = context.Event(), context.Queue()
        host, port = sandbox_url.rsplit("//", 1)[1].split(":")
        self.start_at = time.time() + 1.0  # the process's own start-up comes first
        self.process = context.Process(
            target=_send_evenly,
            args=(host, int(port), rate, self.start_at, self.stopping, self.results),
            daemon=True,
        )
        self.process.start()

    def stop(self) -> list[tuple[int, float, float, float]]:
        self.stopping.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                sent = self.results.get(timeout=0.5)
            except queue.Empty:
                if self.process.exitcode is not None:
                    raise RuntimeError(f"the paced sender exited with {self.process.exitcode}") from None
                continue
            self.process.join(10)
            return sent
        raise RuntimeError("the paced sender did not stop within 60 s")


def calibration(sent: list[tuple[int, float, float, float]], probe: list[list]) -> dict:
    """The sender's own send times against the sandbox's kernel-stamped and handler-stamped counts."""
    arrivals = {int(tag): (arrived, handled) for arrived, handled, tag in probe}
    matched = [(before, after, *arrivals[number]) for number, _, before, after in sent if number in arrivals]
    if not matched:
        return {"requests": 0}
    in_send_call = sum(
        1 for before, after, arrived, _ in matched if before - 0.001 <= arrived <= after + 0.001
    )
    kernel_off = [abs(arrived - (before + after) / 2) for before, after, arrived, _ in matched]
    handler_late = [handled - after for _, after, _, handled in matched]
    schedule_late = [before - due for _, due, before, _ in sent]
    return {
        "requests": len(matched),
        "sent_not_answered": len(sent) - len(matched),
        "rate": round(len(sent) / (sent[-1][2] - sent[0][2]), 2) if len(sent) > 1 else None,
        "busiest_sliding_second_sent": busiest_window([before for before, _, _, _ in matched]),
        "busiest_sliding_second_kernel": busiest_window([arrived for _, _, arrived, _ in matched]),
        "busiest_sliding_second_handler": busiest_window([handled for _, _, _, handled in matched]),
        "kernel_stamp_within_send_call": round(in_send_call / len(matched), 4),
        "kernel_stamp_off_ms_max": round(max(kernel_off) * 1000, 2),
        "handler_after_send_ms": {
            "p50": round(quantile(handler_late, 0.5) * 1000, 1),
            "p95": round(quantile(handler_late, 0.95) * 1000, 1),
            "max": round(max(handler_late) * 1000, 1),
        },
        "sender_behind_schedule_ms": {
            "p95": round(quantile(schedule_late, 0.95) * 1000, 1),
            "max": round(max(schedule_late) * 1000, 1),
        },
    }


def busiest_window(timestamps: list[float], width: float = 1.0) -> int:
    """The most timestamps in any half-open window of `width` seconds."""
    timestamps = sorted(timestamps)
    best, left = 0, 0
    for right, moment in enumerate(timestamps):
        while moment - timestamps[left] >= width:
            left += 1
        best = max(best, right - left + 1)
    return best


def running_times(app, ids: list[str]) -> tuple[list[float], list[float]]:
    """When each lookup's OpenCNPJ call started (its `running` event's log id, server ms), and how late.

    Lateness: the call's start minus the `scheduled_at` its token was reserved for (calls that had
    to wait for a token only).
    """
    events = services(app).events
    times, lateness = [], []
    for lookup_id in ids:
        scheduled = None
        for message in events.read_after(lookup_id):
            if message.type != "source":
                continue
            data = orjson.loads(message.data)
            if data.get("source") != SOURCE:
                continue
            if data.get("state") == "rate_limited" and data.get("scheduled_at"):
                scheduled = data["scheduled_at"]
            elif data.get("state") == "running":
                started = int(message.id.split("-")[0]) / 1000
                times.append(started)
                if scheduled is not None:
                    lateness.append(started - scheduled)
                    scheduled = None
    return times, lateness


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(arguments: argparse.Namespace, deployed: Service, app: Flask, seed: int) -> dict:
    limiter = services(app).rate_limiter
    url, sandbox_url = deployed.web_url, deployed.sandbox_url
    rate = LIMIT_PER_MINUTE / 60
    burst = deployed.settings.sources[SOURCE].burst
    count = int(arguments.rate * arguments.seconds)
    identifiers = harness.valid_cnpjs(count, seed=seed)
    limiter.reset(SOURCE)
    requests.post(f"{sandbox_url}/_control", json={"reset": True}, timeout=5).raise_for_status()
    sampler = Sampler(limiter)
    sampler.start()
    sender = PacedSender(sandbox_url, rate) if arguments.calibrate else None
    time.sleep(1.0)
    host, port = url.rsplit("//", 1)[1].split(":")
    log(f"offering {count:,} lookups at {arguments.rate:g}/s for {arguments.seconds:g} s")
    offered = asyncio.run(_offer(host, int(port), identifiers, arguments.rate, arguments.connections))
    log(
        f"offered in {offered['seconds']:.1f} s ({len(offered['ids']):,} accepted, {len(offered['errors'])} errors, "
        f"schedule lateness up to {offered['max_lateness'] * 1000:.0f} ms)"
    )
    observe_until = time.time() + arguments.observe
    while time.time() < observe_until:
        time.sleep(0.5)
        if not arguments.quick and sampler.samples and sampler.samples[-1][1] >= 0:
            time.sleep(1.0)  # the backlog is gone: one more second of samples, then stop
            break
    sent = sender.stop() if sender is not None else []
    sampler.stop()
    load_end = round(os.getloadavg()[0], 2)
    stats = requests.get(f"{sandbox_url}/_stats", timeout=5).json()["upstreams"][SOURCE]
    recorded = requests.get(f"{sandbox_url}/_arrivals/{SOURCE}", timeout=30).json()
    arrived = sorted(entry[0] for entry in recorded["requests"])
    handled = sorted(entry[1] for entry in recorded["requests"])
    samples = sampler.samples
    backlog_times = [t for t, tokens in samples if tokens < 0]
    if not arrived or not backlog_times:
        raise RuntimeError("the source was never called, or never had a backlog")
    start, backlog_end = arrived[0], max(backlog_times)
    counts = per_second(arrived, start, backlog_end)
    served_in_backlog = sum(counts)
    utilisation = served_in_backlog / (rate * len(counts)) if counts else None
    started_calls, lateness = running_times(app, offered["ids"])
    events_window = [t for t in started_calls if start <= t <= backlog_end]
    probe = requests.get(f"{sandbox_url}/_arrivals/_probe", timeout=30).json()["requests"] if sent else []
    result = {
        "offered": len(identifiers),
        "accepted": len(offered["ids"]),
        "errors": offered["errors"][:20],
        "offer_seconds": round(offered["seconds"], 2),
        "max_schedule_lateness_ms": round(offered["max_lateness"] * 1000, 1),
        "limit_per_second": rate,
        "burst": burst,
        "backlog_seconds": round(backlog_end - start, 1),
        "per_second": counts,
        "busiest_second": max(counts) if counts else None,
        "kernel_stamped": recorded["kernel_stamped"],
        "sandbox_requests": len(arrived),
        "busiest_sliding_second_exact": busiest_window(arrived),
        "busiest_sliding_minute_exact": busiest_window(arrived, 60.0),
        "busiest_sliding_second_handler": busiest_window(handled),
        "busiest_sliding_minute_handler": busiest_window(handled, 60.0),
        "sandbox_stats_busiest": [stats["busiest_second"], stats["busiest_minute"]],
        "busiest_sliding_second_worker_events": busiest_window(started_calls),
        "busiest_sliding_second_admitted": busiest_window(sampler.slots()),
        "busiest_sliding_minute_admitted": busiest_window(sampler.slots(), 60.0),
        "send_slots_taken": len(sampler.slots()),
        "send_slots_given_back": len(sampler.given_back),
        "served_during_backlog": served_in_backlog,
        "utilisation": round(utilisation, 4) if utilisation is not None else None,
        "worker_calls_during_backlog": len(events_window),
        "deferred_calls": len(lateness),
        "start_after_reserved_slot_ms": {
            "p50": round(quantile(lateness, 0.5) * 1000, 1) if lateness else None,
            "p95": round(quantile(lateness, 0.95) * 1000, 1) if lateness else None,
            "max": round(max(lateness) * 1000, 1) if lateness else None,
        },
        "sandbox_statuses": stats["by_status"],
        "calibration": calibration(sent, probe) if sent else None,
        "load_1m_end": load_end,
    }
    log(
        f"busiest sliding second {result['busiest_sliding_second_exact']} by arrival "
        f"({result['busiest_sliding_second_handler']} by the handler's clock, worker events "
        f"{result['busiest_sliding_second_worker_events']}), busiest minute {result['busiest_sliding_minute_exact']}, "
        f"utilisation {result['utilisation']} over {len(counts)} s of backlog; 1-min load {load_end}"
    )
    if result["calibration"]:
        log(f"calibration: {result['calibration']}")
    return result


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: Processes) -> dict:
        env = {**harness.NO_LIMITS, f"RATE_LIMIT_{SOURCE.upper()}": str(LIMIT_PER_MINUTE)}
        deployed, app, server = start_service_with(tmp, processes, arguments.workers, env)
        pacing = dataclasses.asdict(services(app).rate_limiter.pacing(SOURCE))
        services_lead = services(app).rate_limiter.send_lead(SOURCE)
        try:
            runs = []
            for repeat in range(arguments.repeats):
                runs.append(one_run(arguments, deployed, app, seed=100 + repeat))
                if repeat + 1 < arguments.repeats:
                    drain(app)
        finally:
            processes.stop_all()
            close_app(app)
            server.stop()
        return {
            "config": {
                "source": SOURCE,
                "rate_limit_per_minute": LIMIT_PER_MINUTE,
                "burst": deployed.settings.sources[SOURCE].burst,
                "worker_nodes": arguments.workers,
                "worker_concurrency": deployed.settings.worker_concurrency,
                "offered_per_second": arguments.rate,
                "offered_seconds": arguments.seconds,
                "repeats": arguments.repeats,
                "deferred_poll_interval": deployed.settings.deferred_poll_interval,
                "pacing": pacing,
                "send_lead": services_lead,
            },
            "runs": runs,
            **{
                name: spread([r[name] for r in runs])
                for name in (
                    "busiest_second",
                    "busiest_sliding_second_exact",
                    "busiest_sliding_minute_exact",
                    "busiest_sliding_second_handler",
                    "busiest_sliding_minute_handler",
                    "busiest_sliding_second_admitted",
                    "busiest_sliding_minute_admitted",
                    "busiest_sliding_second_worker_events",
                    "utilisation",
                    "backlog_seconds",
                    "load_1m_end",
                )
            },
            "lateness_p95_ms": spread([r["start_after_reserved_slot_ms"]["p95"] for r in runs]),
            "lateness_max_ms": spread([r["start_after_reserved_slot_ms"]["max"] for r in runs]),
            **{
                f"calibration_{name}": spread([(r["calibration"] or {}).get(name) for r in runs])
                for name in (
                    "busiest_sliding_second_sent",
                    "busiest_sliding_second_kernel",
                    "busiest_sliding_second_handler",
                    "kernel_stamp_within_send_call",
                    "kernel_stamp_off_ms_max",
                )
            },
        }

    return run


def drain(app: Flask) -> None:
    """Wait until the source's bucket has no reservations left (the previous run's backlog)."""
    limiter = services(app).rate_limiter
    deadline = time.time() + 600
    while limiter.tokens(SOURCE) < 0 and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)


def markdown(report: dict) -> str:
    config = report["config"]
    limit = config["rate_limit_per_minute"] / 60
    ceiling = limit + config["burst"]
    # Judged on the sandbox's exact sliding counts of every arrival, by the kernel's stamps.
    busiest = report["busiest_sliding_second_exact"]["median"]
    worst = report["busiest_sliding_second_exact"]["max"]
    minute_exact = report["busiest_sliding_minute_exact"]["max"]
    minute_goal = config["rate_limit_per_minute"] + config["burst"]
    yes_no = {True: "yes", False: "**no**"}
    run = report["runs"][len(report["runs"]) // 2]
    minute = minute_max(run)
    lines = [
        harness.header(
            report, "Rate-limit fidelity: one source at 20 requests/s (`bench/rate_fidelity.py`, benchmark 6)"
        ),
        f"OpenCNPJ limited to `RATE_LIMIT_OPENCNPJ={config['rate_limit_per_minute']}` ({limit:g}/s, burst "
        f"{config['burst']}), every other source and the per-client limit off; sandbox at 0 ms with quotas off; "
        f"{config['worker_nodes']} worker nodes of threads × {config['worker_concurrency']} (the service's command "
        f"line); {config['offered_per_second']:g} unique CNPJ lookups/s offered for {config['offered_seconds']:g} s "
        "by an open-loop asyncio client. Counted by the sandbox: every OpenCNPJ request at the time the kernel "
        "stamped its arrival (`devstack.sandbox_worker`), exactly, over sliding windows; per whole second from "
        "the first call until the source's bucket has no reservations left (the backlog). 1-min load average "
        f"at the end of the run: {cell(report['load_1m_end'], 2)}. Median of {config['repeats']} run(s), (min–max).\n",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
        f"| busiest sliding 1 s at the sandbox (every arrival, kernel stamps) | "
        f"{cell(report['busiest_sliding_second_exact'], 0)} | ≤ {ceiling:g} (limit + burst) | "
        f"{yes_no[worst is not None and worst <= ceiling]} |",
        f"| busiest sliding 60 s at the sandbox (every arrival, kernel stamps) | "
        f"{cell(report['busiest_sliding_minute_exact'], 0)} | ≤ {minute_goal:,} (the limit per minute + burst) | "
        f"{yes_no[minute_exact is not None and minute_exact <= minute_goal]} |",
        f"| share of the limit used while a backlog exists | {cell(report['utilisation'], 3)} | ≥ 0.95 | "
        f"{yes_no[report['utilisation']['min'] is not None and report['utilisation']['min'] >= 0.95]} |",
        f"| the same two counts by the sandbox's handler clock (the instrument before) | "
        f"{cell(report['busiest_sliding_second_handler'], 0)} / {cell(report['busiest_sliding_minute_handler'], 0)} "
        "| | |",
        f"| busiest sliding 1 s / 60 s of send slots in the limiter's own log (Valkey's clock) | "
        f"{cell(report['busiest_sliding_second_admitted'], 0)} / {cell(report['busiest_sliding_minute_admitted'], 0)} "
        "| | |",
        f"| busiest whole second / 60 whole seconds at the sandbox (one run) | {fmt(run['busiest_second'], 0)} / "
        f"{fmt(minute, 0)} | | |",
        f"| backlog length (s) | {cell(report['backlog_seconds'], 1)} | | |",
        f"| send slots taken / given back by a call whose thread ran too late for its slot (one run) | "
        f"{fmt(run.get('send_slots_taken'), 0)} / {fmt(run.get('send_slots_given_back'), 0)} | | |",
        f"| deferred call's start after its reserved slot (sent {fmt(config.get('send_lead', 0) * 1000, 0)} ms "
        f"ahead of it), p95 / max (ms) | {cell(report['lateness_p95_ms'], 0)} / "
        f"{cell(report['lateness_max_ms'], 0)} | | |",
        f"| lookups offered / accepted, offer took (s) | {run_offer(report)} | {config['offered_per_second']:g}/s "
        f"for {config['offered_seconds']:g} s | |",
    ]
    lines.append(
        f"\nRequests per second at the sandbox, one run: {', '.join(fmt(c, 0) for c in run['per_second'][:60])}"
        + (" …" if len(run["per_second"]) > 60 else "")
        + f". Baseline for the ratio: the limit itself, {limit:g}/s; busiest sliding second ÷ limit "
        f"= {fmt(busiest / limit, 2) if busiest else 'n/a'}."
    )
    lines.extend(calibration_lines(report, limit))
    achieved = run["accepted"] / run["offer_seconds"] if run["offer_seconds"] else None
    if achieved is not None and achieved < 0.9 * config["offered_per_second"]:
        lines.append(
            f"\nThe client offered on schedule but the service accepted only {fmt(achieved)} lookups/s "
            f"({run['accepted']:,} in {fmt(run['offer_seconds'])} s): the web workers, three worker nodes, Valkey "
            "and the sandbox share two cores (and did so with other sessions' work; see the load average). The "
            "source's demand still exceeded its limit throughout, so the backlog and both goals are measured as "
            "specified."
        )
    lines.append(EXPLANATION)
    pacing = config.get("pacing") or {
        "gap": 1 / (limit + config["burst"]),
        "widen": 0.045,
        "tolerance": 0.0225,
    }
    lines.append(
        PACING.format(
            gap=pacing["gap"] * 1000,
            widen=pacing["widen"] * 1000,
            tolerance=pacing["tolerance"] * 1000,
            lead=config.get("send_lead", 0.5) * 1000,
        )
    )
    return "\n".join(lines) + "\n"


def calibration_lines(report: dict, limit: float) -> list[str]:
    """The calibration's table: the evenly paced sender's own count against the sandbox's two."""
    if report.get("calibration_busiest_sliding_second_sent", {}).get("median") is None:
        return ["\nNo calibration in this run (`--no-calibration`)."]
    run = report["runs"][len(report["runs"]) // 2]["calibration"]
    handler = run["handler_after_send_ms"]
    return [
        f"\nCalibration of the instrument, in the same run and under its load: a separate process sent "
        f"{limit:g} requests/s on a fixed schedule (request n at start + n/{limit:g} s, each on a connection "
        "of its own opened just before, its answer read by a thread of its own, so a late answer never held "
        "a send up) to the sandbox's `/_probe/<n>` from the offer's start "
        f"until the backlog was gone ({run['requests']:,} requests in the run shown; the sender itself ran up to "
        f"{fmt(run['sender_behind_schedule_ms']['max'], 0)} ms behind its schedule, p95 "
        f"{fmt(run['sender_behind_schedule_ms']['p95'], 1)} ms).\n",
        "| busiest sliding 1 s of the probe's requests | counted |",
        "|---|---|",
        f"| by the sender's own send times | {cell(report['calibration_busiest_sliding_second_sent'], 0)} |",
        f"| by the sandbox, kernel stamps (the instrument now) | "
        f"{cell(report['calibration_busiest_sliding_second_kernel'], 0)} |",
        f"| by the sandbox, its handler's clock (the instrument before) | "
        f"{cell(report['calibration_busiest_sliding_second_handler'], 0)} |",
        f"\nEvery kernel stamp against its own request's send call: "
        f"{fmt(run['kernel_stamp_within_send_call'] * 100, 1)}% inside it (±1 ms), at most "
        f"{fmt(run['kernel_stamp_off_ms_max'], 2)} ms from its middle. The handler ran p50 "
        f"{fmt(handler['p50'], 1)} ms, p95 {fmt(handler['p95'], 1)} ms and up to {fmt(handler['max'], 0)} ms after "
        "the send: a sandbox starved of CPU handles requests that arrived evenly in bunches, so the handler's "
        "clock counts bunches the wire never carried.",
    ]


EXPLANATION = """
The instrument: the sandbox used to stamp each request in its gevent handler, which on two shared
cores runs when the process gets CPU, so requests that arrived evenly were stamped in bunches (the
calibration's sender, evenly at the limit, is counted well above it by the handler's clock). The
sandbox now runs under `devstack.sandbox_worker.StampingGeventWorker`: `SO_TIMESTAMPNS` on its
listening sockets makes the kernel stamp every arriving segment, and the worker reads requests with
`recvmsg`, so each request is counted at the kernel's receive time, which on loopback is taken in
the sender's own `send` call, however late the sandbox gets round to it. Kernel stamps rather than
a separate accepting process or a raised priority: a process of its own is starved like any other on
two busy cores (and an accept time says nothing of the next request on a keep-alive connection), and
a higher priority needs privileges and still leaves a scheduling delay.
"""

PACING = """
The service: a call that waited for a token starts late (the dispatcher's poll, the broker queue,
a worker thread, the GIL: p95 299 ms and up to 1,081 ms after its slot in the full run of
2026-12-01), by different amounts, so calls of consecutive slots used to reach the upstream
bunched. The limiter's log of starts checked each call on Valkey's clock before it went out, but
let rate + burst starts go in any second all at once, and the Python steps from that check to the
socket (a thread preempted among them) moved calls across second boundaries. Measured with the
instrument above and the service as it was (this benchmark, `--quick`, 2026-12-03, 1-min load
about 6): 23 requests in the busiest second at the sandbox against 21 (35 by the handler's
clock); the full run of 2026-12-01 had counted 39, and 1,206 in a minute, by the handler's clock.

Now each call, once past its breaker with its request built, takes a *send slot*
(`rate_limiter.RateLimiter.await_send`, one Lua script, one round trip): the earliest time on
Valkey's clock on an even pace of one slot every {gap:.1f} ms (a little under 1 / (limit + burst);
after a lull the burst goes at once) whose second and minute, each widened by {widen:.0f} ms, still
hold fewer than limit + burst slots. The call sleeps until its slot in its own thread (or is
deferred, keeping its token, when the slot is more than a second away), and its connection looks
at the clock again right before the request's first byte is written: a thread that got there more
than {tolerance:.1f} ms past its slot gives the slot back and takes the next free one (the "given
back" row). So each request leaves within {tolerance:.1f} ms of a slot plus the steps to the socket,
which the rest of the widening covers, one at a time: a late call never goes out in a bunch with
the others. The widening is what the windows can spare and still carry the limit, which leaves
them almost no room to catch up after a gap (21 in 1.045 s is 20.1 a second): so a call waiting
for a token is sent {lead:.0f} ms ahead of it, to wait at its send slot instead of reaching it late,
and the share of the limit used depends on the workers getting calls to their slots in time: on
two cores shared with other work (see the load average) a starved worker misses slots the
upstream can then never have.
"""


def minute_max(run: dict) -> float | None:
    """The most requests in any 60 whole consecutive seconds of the run (None if it was shorter)."""
    counts = run["per_second"]
    if len(counts) < 60:
        return None
    return max(sum(counts[i : i + 60]) for i in range(len(counts) - 59))


def run_offer(report: dict) -> str:
    run = report["runs"][len(report["runs"]) // 2]
    return f"{run['offered']:,} / {run['accepted']:,}, {fmt(run['offer_seconds'])} s"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s offered, 10 s more observed (< 60 s)")
    parser.add_argument("--seconds", type=float, help="seconds of offered load (default 30; quick 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="lookups offered per second")
    parser.add_argument("--workers", type=int, default=3, help="Celery worker nodes")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--repeats", type=int, help="runs (default 1: each drains a backlog of minutes)")
    parser.add_argument("--observe", type=float, help="seconds to keep sampling after the offer ends")
    parser.add_argument(
        "--no-calibration", dest="calibrate", action="store_false", help="no evenly paced probe sender"
    )
    parser.add_argument("--render", metavar="JSON", help="only rewrite the doc section from a saved full run")
    arguments = parser.parse_args(argv)
    if arguments.render:
        return harness.render(NAME, arguments.render, markdown)
    arguments.seconds = arguments.seconds or (10.0 if arguments.quick else 30.0)
    arguments.repeats = arguments.repeats or 1
    arguments.observe = (
        arguments.observe if arguments.observe is not None else (10.0 if arguments.quick else 240.0)
    )
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
