"""Event-streams benchmark: our shared-subscription streams (sse_streaming) against flask-sse 1.0.0.

Starts its own embedded Valkey and, per design, gunicorn with one gevent worker; the load comes
from bench/sse_load.py in a separate process, the publisher runs here.  Every figure is measured
on this machine; see docs/benchmarks.md for the claims, the goals and the latest results.
Processes, Valkey, the results file and the docs section come from bench/harness.py.

    .venv/bin/python -m bench.streams            # full: 1,000 streams x 3 repeats, 5,000 stretch
    .venv/bin/python -m bench.streams --quick    # 100 streams, 5 trials, one repeat (< 60 s)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import redis
import requests
from flask_sse import sse

from app import create_app
from bench import harness
from bench.baselines import flask_sse_app
from bench.harness import ROOT, Processes, log, wait_for
from devstack.embedded_redis import free_port
from enrich.identifiers import cnpj_check_digits, parse
from enrich.lookups import Lookup, LookupStatus, SourceResult, SourceState, new_lookup_id
from enrich.services import services
from enrich.settings import Settings
from enrich.sources import build_sources, sources_for

NAME = "streams"
QUICK_MARK = "**quick mode**"

# What the issue measured for flask-sse 1.0.0 and what ours must do.
ISSUE_FLASK_SSE = {
    "first_window_loss_pct": 20.0,
    "first_window_first_lost_trials": "49 of 50",
    "reconnect_missed": "all",
    "publish_ms": 2.3,
    "reused_client_publish_ms": 0.13,
    "redis_connections": "one per stream",
    "p99_ms_at_1000": 650.0,
    "overflow_answered": 0,
    "closed_stream_connections": "kept until an event",
}
GOALS = {
    "first_window_lost": 0,
    "reconnect_missed": 0,
    "reconnect_duplicated": 0,
    "redis_connections_max": 10,
    "p99_ms": 100.0,
    "overflow_answered_pct": 100.0,
    "closed_streams_released": True,
}

EVENTS_PER_WINDOW = 10  # the "first 50 ms" test: 10 events over 50 ms from the connection's start
WINDOW_SECONDS = 0.050
OVERFLOW_PROBES = 50  # connections opened beyond the streams already open (>= 1,000)
SLOW_SECONDS = 0.100  # an event slower than the p99 goal: counted, and grouped into bursts


# -- processes --------------------------------------------------------------------------------


class WebServer:
    """gunicorn with one gevent worker (a child of `processes`), and what its worker holds."""

    def __init__(self, processes: Processes, name: str, app_spec: str, env: dict, extra: list[str]) -> None:
        self.processes, self.name, self.app_spec, self.extra = processes, name, app_spec, extra
        self.gc_log = processes.tmp / f"{name}-gc.log"
        self.env = {**env, "BENCH_GC_LOG": str(self.gc_log)}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> WebServer:
        command = [
            str(harness.BIN / "gunicorn"),
            "-k",
            "gevent",
            "-w",
            "1",
            "--no-control-socket",
            "-b",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            "-c",  # a post_fork hook that logs the worker's GC pauses; no other setting
            str(ROOT / "bench" / "gc_probe.py"),
            *self.extra,
            self.app_spec,
        ]
        self.process = self.processes.spawn(self.name, command, self.env)
        wait_for(
            lambda: harness.answers(f"{self.url}/healthz") and self.worker(),
            timeout,
            self.name,
            self.process,
            lambda: self.processes.log_tail(self.name),
        )
        return self

    def worker(self) -> psutil.Process | None:
        children = psutil.Process(self.process.pid).children()
        return children[0] if children else None

    def redis_connections(self, redis_port: int) -> int:
        """Established TCP connections from the worker process to Redis."""
        return sum(
            1
            for c in self.worker().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
        )

    def rss(self) -> int:
        return self.worker().memory_info().rss

    def gc_pauses(self, since: float, until: float) -> list[tuple[float, float, int]]:
        """The worker's collections longer than 1 ms that ended between `since` and `until` (epoch s)."""
        if not self.gc_log.exists():
            return []
        pauses = []
        for line in self.gc_log.read_text().splitlines():
            ended, milliseconds, generation = line.split()
            if since <= float(ended) <= until + 1.0:
                pauses.append((float(ended), float(milliseconds), int(generation)))
        return pauses

    def stop(self) -> None:
        # SIGINT: gunicorn's quick shutdown (SIGTERM would wait up to 30 s for the streams to end).
        self.processes.stop(self.name, timeout=5, sig=signal.SIGINT)


class LoadClient:
    """Drives bench/sse_load.py: one JSON command per line, one JSON answer per line."""

    name = "client"

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        command = [sys.executable, "-m", "bench.sse_load"]
        self.process = processes.spawn(self.name, command, {**os.environ}, piped=True)
        self._lock = threading.Lock()

    def call(self, op: str, **arguments) -> dict:
        with self._lock:
            self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load client died:\n{self.processes.log_tail(self.name)}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load client {op}: {answer['error']}")
        return answer

    def stop(self) -> None:
        """Ask the client to exit; kill it if it has not within 5 s."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.process.stdin.write('{"op": "exit"}\n')
                self.process.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        self.processes.stop(self.name, sig=signal.SIGKILL)


# -- the two designs ------------------------------------------------------------------------------


class Ours:
    """sse_streaming: lookups' event logs, one hub subscription per web process."""

    name = "ours"
    open_wait = "event"  # headers and a snapshot go out at once

    def __init__(self, redis_url: str, processes: Processes) -> None:
        self.processes = processes
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "KEY_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "DATA_DIR": str(processes.tmp),
            "SANDBOX_HOST": "127.0.0.1",
            "SANDBOX_PORT": "9",
            "PYTHONUNBUFFERED": "1",
        }
        self.settings = Settings.from_env(self.env)
        self.app = create_app(self.settings)
        self.events = services(self.app).events
        self.lookups = services(self.app).lookups
        self.redis = services(self.app).redis

    def server(self, label: str, **env: str) -> WebServer:
        return WebServer(
            self.processes,
            f"ours-{label}",
            "app:create_app()",
            {**self.env, **env},
            ["--worker-connections", "10000"],
        )

    def channels(self, count: int) -> list[str]:
        """Queued CNPJ lookups, written as POST /api/lookups writes them (see new_lookup below)."""
        return [new_lookup(self.lookups) for _ in range(count)]

    def stream_url(self, server: WebServer, channel: str) -> str:
        return f"{server.url}/api/lookups/{channel}/events"

    def publish(self, channel: str, seq: int) -> str | None:
        return self.events.publish(channel, "source", {"seq": seq, "sent": time.time()})

    def wait_subscribed(self, channels: list[str], timeout: float) -> int:
        return len(channels)  # a stream is live once its snapshot arrived

    def open_streams(self, server: WebServer) -> int | None:
        return requests.get(f"{server.url}/api/status", timeout=10).json()["event_streams"]["open_streams"]

    def close(self) -> None:
        self.redis.close()


class FlaskSse:
    """flask-sse 1.0.0 as published: `sse.publish` opens a client per call, a pubsub per stream."""

    name = "flask_sse"
    open_wait = "sent"  # flask-sse sends its response headers with the first published event

    def __init__(self, redis_url: str, processes: Processes) -> None:
        self.processes = processes
        self.env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        self.app = flask_sse_app.create_app()
        self.app.config["REDIS_URL"] = redis_url
        self.sse = sse
        self.prefix = f"bsse{uuid.uuid4().hex[:8]}"
        self.counter = itertools.count()
        self.redis = redis.Redis.from_url(redis_url)  # the benchmark's own, for PUBSUB NUMSUB only
        self._local = threading.local()

    def server(self, label: str, **env: str) -> WebServer:
        return WebServer(
            self.processes,
            f"flask-sse-{label}",
            "bench.baselines.flask_sse_app:create_app()",  # imported from the working directory, ROOT
            {**self.env, **env},
            [],
        )

    def channels(self, count: int) -> list[str]:
        return [f"{self.prefix}:{next(self.counter)}" for _ in range(count)]

    def stream_url(self, server: WebServer, channel: str) -> str:
        return f"{server.url}/stream?channel={channel}"

    def publish(self, channel: str, seq: int) -> str:
        if not getattr(self._local, "context", None):  # a flask-sse app publishes in its app context
            self._local.context = self.app.app_context()
            self._local.context.push()
        self.sse.publish({"seq": seq, "sent": time.time()}, type="source", id=str(seq + 1), channel=channel)
        return str(seq + 1)

    def subscribed(self, channels: list[str]) -> int:
        count = 0
        for start in range(0, len(channels), 1000):
            count += sum(1 for _, n in self.redis.pubsub_numsub(*channels[start : start + 1000]) if n > 0)
        return count

    def wait_subscribed(self, channels: list[str], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (count := self.subscribed(channels)) < len(channels) and time.monotonic() < deadline:
            time.sleep(0.1)
        return count

    def open_streams(self, server: WebServer) -> int | None:
        return None  # flask-sse has no status endpoint

    def close(self) -> None:
        self.redis.close()


def random_cnpj() -> str:
    base = f"{random.randrange(10**7, 10**8)}{random.randrange(1, 10**4):04d}"
    return base + cnpj_check_digits(base)


def new_lookup(store) -> str:
    """A queued CNPJ lookup record, as pipeline.start_lookup writes one for `refresh: true`.

    The stream view reads only the record (`LookupStore.get`), so this is what a stream sees after
    POST /api/lookups; the single-flight key, deadline entry and Celery messages are left out
    because no worker runs here (they would only sit in Redis).
    """
    identifier = parse(random_cnpj(), "cnpj")
    sources = build_sources(store.settings)
    names = [s.name for s in sources_for("cnpj", sources) if s.supports(identifier)]
    now = time.time()
    lookup = Lookup(
        id=new_lookup_id(),
        type="cnpj",
        identifier=identifier.value,
        priority=5,
        status=LookupStatus.QUEUED,
        created_at=now,
        deadline_at=now + store.settings.lookup_deadline,
        sources={name: SourceResult(name, SourceState.PENDING) for name in names},
    )
    store.create(lookup)
    return lookup.id


# -- figures --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(runs: list[dict]) -> dict:
    """Median and min-max of each numeric figure over the repeats."""
    summary = {}
    for name in runs[0]:
        values = [
            run[name]
            for run in runs
            if isinstance(run.get(name), int | float) and not isinstance(run.get(name), bool)
        ]
        if len(values) == len(runs):
            summary[name] = {
                "median": round(statistics.median(values), 3),
                "min": min(values),
                "max": max(values),
            }
    return summary


def count_windows(times: list[float], gap: float = 0.3) -> int:
    """How many separate bursts (no two `gap` seconds apart) `times` fall into."""
    bursts, last = 0, None
    for moment in sorted(times):
        if last is None or moment - last > gap:
            bursts += 1
        last = moment
    return bursts


def publish_schedule(design, items: list[tuple[float, str, int]], threads: int = 4) -> list[float]:
    """Publish (due monotonic time, channel, seq) items on time from `threads` threads; durations (s)."""
    durations: list[float] = []
    lock = threading.Lock()
    queue_ = iter(items)

    def run() -> None:
        while True:
            with lock:
                item = next(queue_, None)
            if item is None:
                return
            due, channel, seq = item
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started = time.perf_counter()
            design.publish(channel, seq)
            elapsed = time.perf_counter() - started
            with lock:
                durations.append(elapsed)

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return durations


class Sampler:
    """Samples the worker's Redis connections and RSS every `interval` seconds; keeps the maxima."""

    def __init__(self, server: WebServer, redis_port: int, interval: float = 2.0) -> None:
        self.server, self.redis_port, self.interval = server, redis_port, interval
        self.max_connections, self.max_rss = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.max_connections = max(
                    self.max_connections, self.server.redis_connections(self.redis_port)
                )
                self.max_rss = max(self.max_rss, self.server.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- scenarios ------------------------------------------------------------------------------------


def warm_up(design, client: LoadClient, server: WebServer) -> None:
    """One stream that receives one event, closed again before the measured streams open."""
    warm = design.channels(1)
    client.call(
        "open",
        streams=[{"key": "warm", "url": design.stream_url(server, warm[0])}],
        wait=design.open_wait,
    )
    design.wait_subscribed(warm, 10)
    design.publish(warm[0], 0)
    client.call("wait", keys=["warm"], count=1, timeout=5)
    client.call("close", keys=["warm"])
    # Both designs notice a closed stream when they next write to it; without this the warm-up
    # stream would hold one of flask-sse's 1,000 worker connections for the whole run.
    for seq in (1, 2):  # the first write after a close may still succeed
        design.publish(warm[0], seq)
        time.sleep(0.25)


def delivery(received: dict, specs: list[dict], events: int) -> dict:
    """What the streams of `specs` received of their `events` events each: latencies, losses, slow ones."""
    latencies, lost, duplicated, slow_sent = [], 0, 0, []
    for spec in specs:
        got = received.get(spec["key"], {"events": []})["events"]
        latencies.extend(event[2] for event in got)
        slow_sent.extend(event[4] - event[2] for event in got if event[2] > SLOW_SECONDS)
        seqs = [event[0] for event in got]
        lost += events - len(set(seqs) & set(range(events)))
        duplicated += len(seqs) - len(set(seqs))
    return {"latencies": latencies, "lost": lost, "duplicated": duplicated, "slow_sent": slow_sent}


def run_main(
    design, client: LoadClient, redis_port: int, streams: int, events: int, rate: float, label: str
) -> dict:
    """N streams, each following its own channel; E events per channel at `rate` events/s."""
    server = design.server(label).start()
    try:
        channels = design.channels(streams + (OVERFLOW_PROBES if streams >= 1000 else 0))
        probes, channels = channels[streams:], channels[:streams]
        warm_up(design, client, server)
        rss_before = server.rss()
        connections_before = server.redis_connections(redis_port)

        specs = [
            {"key": f"{label}:{i}", "url": design.stream_url(server, channel)}
            for i, channel in enumerate(channels)
        ]
        opened = client.call("open", streams=specs, wait=design.open_wait)
        served = design.wait_subscribed(channels, 30 if streams > 1000 else 60)
        time.sleep(1.0)
        rss_open = server.rss()
        connections_open = server.redis_connections(redis_port)
        status_open = design.open_streams(server)

        start = time.monotonic() + 0.2
        schedule = [(start + k / rate, channels[k % streams], k // streams) for k in range(streams * events)]
        publish_started = time.time()
        with Sampler(server, redis_port) as sampler:
            durations = publish_schedule(design, schedule)
            publish_seconds = time.monotonic() - start
            expected = streams * events
            deadline = time.monotonic() + 10
            while client.call("count")["events"] < expected and time.monotonic() < deadline:
                time.sleep(0.1)
        publish_ended = time.time()
        received = client.call("collect", keys=[spec["key"] for spec in specs])["streams"]
        got = delivery(received, specs, events)
        latencies = got["latencies"]

        pauses = server.gc_pauses(publish_started, publish_ended)
        overflow = None
        if probes:
            overflow = probe_overflow(design, client, server, probes)
        client.call("close", keys=[spec["key"] for spec in specs])
        return {
            "streams": streams,
            "events_per_stream": events,
            "target_rate": rate,
            "opened": opened["ok"],
            "open_failed": opened["failed"],
            "open_errors": opened["errors"],
            "open_seconds": round(opened["seconds"], 3),
            "served_streams": served,
            "status_open_streams": status_open,
            "published": len(durations),
            "publish_rate": round(len(durations) / publish_seconds, 1),
            "publish_ms_median": ms(statistics.median(durations)),
            "publish_ms_p99": ms(percentile(durations, 99)),
            "delivered": len(latencies),
            "lost": got["lost"],
            "duplicated": got["duplicated"],
            "latency_ms_p50": ms(percentile(latencies, 50)),
            "latency_ms_p95": ms(percentile(latencies, 95)),
            "latency_ms_p99": ms(percentile(latencies, 99)),
            "latency_ms_max": ms(max(latencies, default=None)),
            "redis_connections_before": connections_before,
            "redis_connections_open": connections_open,
            "redis_connections_max": max(connections_open, sampler.max_connections),
            "rss_mib_before": round(rss_before / 2**20, 1),
            "rss_mib_open": round(rss_open / 2**20, 1),
            "kib_per_stream": round((rss_open - rss_before) / 1024 / streams, 2),
            "slow_events": len(got["slow_sent"]),
            "slow_windows": count_windows(got["slow_sent"]),
            "worker_gc_max_pause_ms": max((p[1] for p in pauses), default=0.0),
            "worker_gc_full_collections": sum(1 for p in pauses if p[2] == 2),
            "overflow_tried": overflow["tried"] if overflow else None,
            "overflow_answered": overflow["answered"] if overflow else None,
        }
    finally:
        server.stop()


def probe_overflow(design, client: LoadClient, server: WebServer, channels: list[str]) -> dict:
    """Open more connections beyond those open; count those answered (headers) within 5 s.

    flask-sse sends headers with the first event, so its probe channels get an event every
    0.5 s meanwhile: any probe the server accepted would see its headers.
    """
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.5):
            for channel in channels:
                design.publish(channel, 0)

    feeder = threading.Thread(target=feed, daemon=True)
    if isinstance(design, FlaskSse):
        feeder.start()
    try:
        specs = [
            {"key": f"probe:{channel}", "url": design.stream_url(server, channel)} for channel in channels
        ]
        return client.call("probe", streams=specs, timeout=5.0)
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join()


def run_first_window(design, client: LoadClient, server: WebServer, trials: int) -> dict:
    """Connect, and publish 10 events over the first 50 ms starting as the connection is initiated."""
    channels = design.channels(trials)
    first_start = time.time() + 0.5
    specs = [
        {
            "key": f"fw:{channel}",
            "url": design.stream_url(server, channel),
            "start_at": first_start + i * 0.25,
        }
        for i, channel in enumerate(channels)
    ]

    def publish_all() -> None:
        for spec, channel in zip(specs, channels, strict=True):
            for seq in range(EVENTS_PER_WINDOW):
                delay = spec["start_at"] + seq * WINDOW_SECONDS / EVENTS_PER_WINDOW - time.time()
                if delay > 0:
                    time.sleep(delay)
                design.publish(channel, seq)

    publisher = threading.Thread(target=publish_all, daemon=True)
    publisher.start()
    received = client.call("trials", trials=specs, window=1.5)["received"]
    publisher.join()
    lost, first_lost, duplicated = 0, 0, 0
    for spec in specs:
        seqs = [event[0] for event in received[spec["key"]]]
        lost += EVENTS_PER_WINDOW - len(set(seqs) & set(range(EVENTS_PER_WINDOW)))
        first_lost += 0 not in seqs
        duplicated += len(seqs) - len(set(seqs))
    published = trials * EVENTS_PER_WINDOW
    return {
        "trials": trials,
        "published": published,
        "lost": lost,
        "lost_pct": round(100 * lost / published, 1),
        "first_event_lost_trials": first_lost,
        "duplicated": duplicated,
    }


def run_reconnect(design, client: LoadClient, server: WebServer, trials: int) -> dict:
    """Receive 3 of 6 events, drop, 3 more are published, reconnect with Last-Event-ID."""
    missed, duplicated, incomplete = 0, 0, 0
    for trial, channel in enumerate(design.channels(trials)):
        url = design.stream_url(server, channel)
        first, second = f"rc{trial}:a", f"rc{trial}:b"
        client.call("open", streams=[{"key": first, "url": url}], wait=design.open_wait)
        design.wait_subscribed([channel], 10)
        for seq in range(3):
            design.publish(channel, seq)
        client.call("wait", keys=[first], count=3, timeout=5)
        got = client.call("collect", keys=[first])["streams"][first]["events"]
        client.call("close", keys=[first])
        if len(got) < 3:
            incomplete += 1
        last_event_id = got[-1][1] if got else None
        for seq in range(3, 6):
            design.publish(channel, seq)
        client.call(
            "open",
            streams=[{"key": second, "url": url, "last_event_id": last_event_id}],
            wait=design.open_wait,
        )
        client.call("wait", keys=[second], count=3, timeout=1.0)
        again = [event[0] for event in client.call("collect", keys=[second])["streams"][second]["events"]]
        client.call("close", keys=[second])
        missed += len({3, 4, 5} - set(again))
        duplicated += sum(1 for seq in again if seq < 3) + len(again) - len(set(again))
    return {
        "trials": trials,
        "expected_after_reconnect": 3 * trials,
        "missed": missed,
        "duplicated": duplicated,
        "first_connection_incomplete": incomplete,
    }


def run_closed(design, client: LoadClient, server: WebServer, redis_port: int, count: int = 100) -> dict:
    """Open `count` streams, close them, and look at what the worker still holds 2 s later."""
    channels = design.channels(count)
    idle = server.redis_connections(redis_port)
    specs = [{"key": f"cl:{channel}", "url": design.stream_url(server, channel)} for channel in channels]
    client.call("open", streams=specs, wait=design.open_wait)
    design.wait_subscribed(channels, 30)
    time.sleep(0.5)
    held_open = server.redis_connections(redis_port)
    client.call("close", keys=[spec["key"] for spec in specs])
    time.sleep(2.0)
    result = {
        "streams": count,
        "redis_connections_idle": idle,
        "redis_connections_open": held_open,
        "redis_connections_2s_after_close": server.redis_connections(redis_port),
        "open_streams_2s_after_close": design.open_streams(server),
    }
    if isinstance(design, FlaskSse):
        for channel in channels:  # flask-sse notices a closed stream only when it writes an event to it
            design.publish(channel, 0)
        time.sleep(1.0)
        result["redis_connections_after_one_event_each"] = server.redis_connections(redis_port)
    else:
        deadline = time.monotonic() + 10
        started = time.monotonic()
        while design.open_streams(server) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        result["open_streams_released_after_s"] = round(2.0 + time.monotonic() - started, 1)
        result["open_streams_final"] = design.open_streams(server)
    return result


def run_publish_cost(design, count: int) -> dict:
    """`count` sequential publishes to a channel nobody follows, from one thread, on an idle server."""
    channel = design.channels(1)[0]
    durations = []
    connections_before = design.redis.info("stats")["total_connections_received"]
    for seq in range(count):
        started = time.perf_counter()
        design.publish(channel, seq)
        durations.append(time.perf_counter() - started)
    opened = design.redis.info("stats")["total_connections_received"] - connections_before
    return {
        "new_redis_connections_per_publish": round(opened / count, 3),
        "publishes": count,
        "ms_median": ms(statistics.median(durations)),
        "ms_p99": ms(percentile(durations, 99)),
    }


# -- report ---------------------------------------------------------------------------------------


def short(value) -> str:
    """A figure as the table shows it: to 3 decimals below 10 (trailing zeros dropped), 1 below 100, else 0."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = (
            f"{value:.3f}".rstrip("0").rstrip(".")
            if abs(value) < 10
            else f"{value:.0f}"
            if abs(value) >= 100
            else f"{value:.1f}"
        )
    return str(value)


def cell(summary: dict, name: str) -> str:
    """`median (min–max)` of a figure over the repeats."""
    figure = summary.get(name)
    return "n/a" if figure is None else harness.cell(figure, number=short)


def markdown(report: dict) -> str:
    ours, base = report["main"]["ours"]["summary"], report["main"]["flask_sse"]["summary"]
    fw, rc, cl, pc = (report[k] for k in ("first_window", "reconnect", "closed_streams", "publish_cost"))
    n = report["config"]["streams"]
    stretch = report.get("stretch")
    lines = [
        "## Event streams: ours against flask-sse 1.0.0 (`bench/streams.py`)",
        "",
        f"Last run {report['date']} on {report['machine']['cpu_count']} CPUs ({report['machine']['cpu_model']}, "
        f"{report['machine']['memory_gib']} GiB; 1-min load average {report['load_average_1m_at_start']} at the "
        f"start, {report['machine']['load_average_1m']} at the end), `{report['command']}`"
        + (f" ({QUICK_MARK}: a smoke run, not a measurement)" if report["config"]["quick"] else "")
        + ".",
        f"One gunicorn gevent worker per design (ours `--worker-connections 10000`, flask-sse gunicorn's "
        f"defaults), embedded Valkey, load from one asyncio client process on loopback, publisher in the "
        f"benchmark process. Main run: {n} streams, each on its own lookup/channel, "
        f"{report['config']['events_per_stream']} events per stream at {report['config']['rate']:.0f} events/s; "
        f"median of {report['config']['repeats']} repeat(s), (min–max) when they differ. "
        f"Raw figures: `bench/results/{report['file']}`.",
        "",
        "| claim | figure | ours | flask-sse (measured) | flask-sse (issue) | goal (ours) | met |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = report["verdicts"]

    def row(claim, figure, ours_value, base_value, issue, goal, verdict):
        met = "n/a" if verdict is None else ("yes" if verdict else "**no**")
        lines.append(f"| {claim} | {figure} | {ours_value} | {base_value} | {issue} | {goal} | {met} |")

    row(
        "1",
        f"events lost, first 50 ms ({fw['ours']['trials']} trials × 10)",
        f"{fw['ours']['lost']} ({fw['ours']['lost_pct']}%)",
        f"{fw['flask_sse']['lost']} ({fw['flask_sse']['lost_pct']}%)",
        "≈20%",
        "0",
        verdicts["first_window"],
    )
    row(
        "1",
        "trials losing the first event",
        fw["ours"]["first_event_lost_trials"],
        fw["flask_sse"]["first_event_lost_trials"],
        "49 of 50",
        "0",
        None,
    )
    row(
        "1",
        f"missed / duplicated after reconnect ({rc['ours']['trials']} trials × 3)",
        f"{rc['ours']['missed']} / {rc['ours']['duplicated']}",
        f"{rc['flask_sse']['missed']} / {rc['flask_sse']['duplicated']}",
        "all missed",
        "0 / 0",
        verdicts["reconnect"],
    )
    row(
        "2",
        "publish cost, idle (median ms, 1 thread)",
        short(pc["ours"]["ms_median"]),
        short(pc["flask_sse"]["ms_median"]),
        "2.3 (reused client 0.13)",
        "per event on the shared pool",
        None,
    )
    row(
        "2",
        "new Redis connections opened per publish (server's count)",
        short(pc["ours"]["new_redis_connections_per_publish"]),
        short(pc["flask_sse"]["new_redis_connections_per_publish"]),
        "1",
        "0 (shared pool)",
        None,
    )
    row(
        "2",
        "publish cost under load (median ms)",
        cell(ours, "publish_ms_median"),
        cell(base, "publish_ms_median"),
        "",
        "",
        None,
    )
    row(
        "2",
        f"Redis connections held by the worker, {n} streams open (max sampled)",
        cell(ours, "redis_connections_max"),
        cell(base, "redis_connections_max"),
        "one per stream",
        "≤ 10",
        verdicts["redis_connections"],
    )
    row(
        "3",
        f"publish→receive p50 / p95 ms at {n} streams",
        f"{cell(ours, 'latency_ms_p50')} / {cell(ours, 'latency_ms_p95')}",
        f"{cell(base, 'latency_ms_p50')} / {cell(base, 'latency_ms_p95')}",
        "",
        "",
        None,
    )
    row(
        "3",
        f"publish→receive p99 ms at {n} streams",
        cell(ours, "latency_ms_p99"),
        cell(base, "latency_ms_p99"),
        "≈650 (at 1,000)",
        "≤ 100",
        verdicts["p99"],
    )
    row(
        "3",
        "publish→receive max ms",
        cell(ours, "latency_ms_max"),
        cell(base, "latency_ms_max"),
        "",
        "",
        None,
    )
    row("3", "events lost in the main run", cell(ours, "lost"), cell(base, "lost"), "", "0", None)
    row(
        "3",
        "events slower than 100 ms, in how many bursts",
        f"{cell(ours, 'slow_events')}, {cell(ours, 'slow_windows')}",
        f"{cell(base, 'slow_events')}, {cell(base, 'slow_windows')}",
        "",
        "",
        None,
    )
    row(
        "3",
        "worker's longest GC pause while publishing (ms)",
        cell(ours, "worker_gc_max_pause_ms"),
        cell(base, "worker_gc_max_pause_ms"),
        "",
        "",
        None,
    )
    row(
        "3",
        f"publish rate reached (events/s; target {report['config']['rate']:.0f}, 4 publisher threads)",
        cell(ours, "publish_rate"),
        cell(base, "publish_rate"),
        "",
        "",
        None,
    )
    row(
        "3",
        "worker memory per open stream (KiB)",
        cell(ours, "kib_per_stream"),
        cell(base, "kib_per_stream"),
        "",
        "reported",
        None,
    )
    row(
        "3",
        f"connections beyond the {n} open answered within 5 s",
        cell(ours, "overflow_answered"),
        cell(base, "overflow_answered"),
        "0 (hangs)",
        f"all {OVERFLOW_PROBES}",
        verdicts["overflow"],
    )
    row(
        "4",
        "Redis connections: 100 streams open → 2 s after closing",
        f"{cl['ours']['redis_connections_open']} → {cl['ours']['redis_connections_2s_after_close']}",
        f"{cl['flask_sse']['redis_connections_open']} → {cl['flask_sse']['redis_connections_2s_after_close']}"
        f" (→ {cl['flask_sse']['redis_connections_after_one_event_each']} after one event each)",
        "kept until an event",
        "released",
        verdicts["closed"],
    )
    row(
        "4",
        "ours: /api/status open_streams 2 s after closing (heartbeat 1 s)",
        f"{cl['ours']['open_streams_2s_after_close']} (0 after {cl['ours']['open_streams_released_after_s']} s)",
        "n/a",
        "",
        "0",
        None,
    )
    if stretch:
        s = stretch["summary"]
        row(
            "3 (stretch)",
            f"ours at {stretch['streams']} streams: p50 / p99 / max ms",
            f"{cell(s, 'latency_ms_p50')} / {cell(s, 'latency_ms_p99')} / {cell(s, 'latency_ms_max')}",
            "not run",
            "",
            "p99 ≤ 100",
            verdicts["stretch_p99"],
        )
        row(
            "3 (stretch)",
            f"ours at {stretch['streams']} streams: lost, Redis conns, KiB/stream, open failures",
            f"{cell(s, 'lost')}, {cell(s, 'redis_connections_max')}, {cell(s, 'kib_per_stream')}, "
            f"{cell(s, 'open_failed')}",
            "not run",
            "",
            "",
            None,
        )
        row(
            "3 (stretch)",
            f"ours at {stretch['streams']} streams: events > 100 ms, bursts, longest worker GC pause ms",
            f"{cell(s, 'slow_events')}, {cell(s, 'slow_windows')}, {cell(s, 'worker_gc_max_pause_ms')}",
            "not run",
            "",
            "",
            None,
        )
    lines += [
        "",
        "Ratios (flask-sse ÷ ours): "
        + ", ".join(f"{k} {short(v)}×" for k, v in report["ratios"].items() if v is not None)
        + ".",
        "",
        "A burst of slow events that coincides with a long worker GC pause is the cyclic garbage "
        "collector stopping the whole gevent worker (every open stream at once); its full collections "
        "grow with the objects each open stream keeps alive. On 2026-11-22 with 5,000 streams a single "
        "full collection took 420 ms and held back all 220 events slower than 100 ms; with the collector "
        "disabled (diagnosis only) p99 fell from 286 ms to 38 ms.",
    ]
    return "\n".join(lines)


def ratio(numerator, denominator) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 1)


# -- driver ---------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 streams, 5 trials, one repeat, no stretch")
    parser.add_argument("--streams", type=int, help="streams of the main run (default 1000)")
    parser.add_argument("--repeats", type=int, help="repeats of the main run (default 3)")
    parser.add_argument("--events", type=int, default=5, help="events per stream in the main run")
    parser.add_argument("--rate", type=float, default=500.0, help="events per second in the main run")
    parser.add_argument("--stretch", type=int, help="streams of ours' stretch run (default 5000; 0: skip)")
    parser.add_argument("--stretch-events", type=int, default=2, help="events per stream in the stretch run")
    parser.add_argument("--trials", type=int, help="trials of the first-50-ms test (default 50)")
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    arguments.streams = arguments.streams or (100 if quick else 1000)
    arguments.repeats = arguments.repeats or (1 if quick else 3)
    arguments.stretch = (0 if quick else 5000) if arguments.stretch is None else arguments.stretch
    arguments.trials = arguments.trials or (5 if quick else 50)
    arguments.reconnect_trials = 3 if quick else 10
    return arguments


def run_scenarios(arguments: argparse.Namespace, designs: dict, client: LoadClient, port: int) -> dict:
    """First 50 ms, reconnect, closed streams and publish cost, per design, on one server each."""
    report: dict = {"first_window": {}, "reconnect": {}, "closed_streams": {}, "publish_cost": {}}
    for name, design in designs.items():
        log(f"{name}: scenarios (first 50 ms, reconnect, closed streams, publish cost)")
        server = design.server("scenarios", SSE_HEARTBEAT_INTERVAL="1").start()
        try:
            report["publish_cost"][name] = run_publish_cost(design, 1000)
            report["first_window"][name] = run_first_window(design, client, server, arguments.trials)
            report["reconnect"][name] = run_reconnect(design, client, server, arguments.reconnect_trials)
            report["closed_streams"][name] = run_closed(design, client, server, port)
        finally:
            server.stop()
        for key in ("publish_cost", "first_window", "reconnect", "closed_streams"):
            log(f"  {key}: {report[key][name]}")
    return report


def run_repeats(arguments: argparse.Namespace, designs: dict, client: LoadClient, port: int) -> dict:
    """The main run, each design in turn per repeat, and ours' stretch run."""
    report: dict = {"main": {}}
    for repeat in range(arguments.repeats):
        for name, design in designs.items():
            log(f"{name}: main run {repeat + 1}/{arguments.repeats}, {arguments.streams} streams")
            figures = run_main(
                design, client, port, arguments.streams, arguments.events, arguments.rate, f"main{repeat}"
            )
            report["main"].setdefault(name, {"runs": []})["runs"].append(figures)
            log("  " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    for name in designs:
        report["main"][name]["summary"] = summarize(report["main"][name]["runs"])

    if arguments.stretch:
        runs = []
        for repeat in range(arguments.repeats):
            log(f"ours: stretch run {repeat + 1}/{arguments.repeats}, {arguments.stretch} streams")
            figures = run_main(
                designs["ours"],
                client,
                port,
                arguments.stretch,
                arguments.stretch_events,
                arguments.rate,
                f"stretch{repeat}",
            )
            runs.append(figures)
            log("  " + ", ".join(f"{k}={v}" for k, v in figures.items()))
        report["stretch"] = {"streams": arguments.stretch, "runs": runs, "summary": summarize(runs)}
    return report


def body(arguments: argparse.Namespace):
    """The benchmark itself, as harness.run_benchmark runs it: every scenario, then the judgement."""

    def run(tmp: Path, processes: Processes) -> dict:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        with contextlib.ExitStack() as cleanup:
            redis_server = harness.start_redis(tmp)
            cleanup.callback(redis_server.stop)
            client = LoadClient(processes)
            cleanup.callback(client.stop)
            designs = {
                "ours": Ours(redis_server.url, processes),
                "flask_sse": FlaskSse(redis_server.url, processes),
            }
            for design in designs.values():
                cleanup.callback(design.close)
            report = run_scenarios(arguments, designs, client, redis_server.port)
            report.update(run_repeats(arguments, designs, client, redis_server.port))
        return judged(report, arguments)

    return run


def judged(report: dict, arguments: argparse.Namespace) -> dict:
    """The report with its configuration, the goals and the issue's figures, ratios and verdicts."""
    ours, base = report["main"]["ours"]["summary"], report["main"]["flask_sse"]["summary"]
    report.update(
        {
            "config": {
                "quick": arguments.quick,
                "streams": arguments.streams,
                "repeats": arguments.repeats,
                "events_per_stream": arguments.events,
                "rate": arguments.rate,
                "stretch": arguments.stretch,
                "stretch_events_per_stream": arguments.stretch_events,
                "first_window_trials": arguments.trials,
                "reconnect_trials": arguments.reconnect_trials,
                "overflow_probes": OVERFLOW_PROBES,
            },
            "goals": GOALS,
            "issue_flask_sse": ISSUE_FLASK_SSE,
            "ratios": {
                "p99 latency": ratio(base["latency_ms_p99"]["median"], ours["latency_ms_p99"]["median"]),
                "idle publish cost": ratio(
                    report["publish_cost"]["flask_sse"]["ms_median"],
                    report["publish_cost"]["ours"]["ms_median"],
                ),
                "Redis connections": ratio(
                    base["redis_connections_max"]["median"], ours["redis_connections_max"]["median"]
                ),
                "memory per stream": ratio(
                    base["kib_per_stream"]["median"], ours["kib_per_stream"]["median"]
                ),
            },
        }
    )
    report["verdicts"] = verdicts(report)
    return report


def verdicts(report: dict) -> dict:
    ours = report["main"]["ours"]["summary"]
    median = {k: v["median"] for k, v in ours.items()}
    overflow = median.get("overflow_answered")
    closed = report["closed_streams"]["ours"]
    result = {
        "first_window": report["first_window"]["ours"]["lost"] == 0,
        "reconnect": report["reconnect"]["ours"]["missed"] == 0
        and report["reconnect"]["ours"]["duplicated"] == 0,
        "redis_connections": ours["redis_connections_max"]["max"] <= GOALS["redis_connections_max"],
        "p99": median["latency_ms_p99"] <= GOALS["p99_ms"],
        "overflow": None if overflow is None else ours["overflow_answered"]["min"] == OVERFLOW_PROBES,
        "closed": closed["redis_connections_2s_after_close"] <= GOALS["redis_connections_max"]
        and closed["open_streams_final"] == 0,
        "stretch_p99": None,
    }
    if report.get("stretch"):
        result["stretch_p99"] = report["stretch"]["summary"]["latency_ms_p99"]["median"] <= GOALS["p99_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
