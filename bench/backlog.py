"""Benchmark 5, backlog: 100,000 lookups enqueued at once, through the real service, all drained.

Starts its own embedded Valkey, the sandbox (latency 0 ms, quotas off), the web server and
Celery worker node(s) with the service's own command lines (launcher.commands) and default
settings, except that every source's rate limit and the per-client lookup limit are off.  An
asyncio HTTP/1.1 client of its own (keep-alive connections, in this process) POSTs one lookup
per unique valid CNPJ as fast as the server takes them; completions are counted from the lookup
records (the lookup store's Redis hashes), never by polling the API.

    .venv/bin/python -m bench.backlog            # 100,000 lookups
    .venv/bin/python -m bench.backlog --quick    # 1,000 lookups (< 60 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
from flask import Flask

from app import close_app, create_app
from bench import harness
from bench.deployment import Service
from bench.harness import Processes, answers, fmt, log, wait_for
from devstack import launcher
from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich.services import services
from enrich.settings import Settings

NAME = "backlog"
GOAL_PEAK_MEMORY = 2**30
SOURCE_FIELDS = ("s:brasilapi", "s:receitaws", "s:opencnpj")


# -- load ---------------------------------------------------------------------------------------


async def _post_all(host: str, port: int, identifiers: list[str], connections: int) -> dict:
    """POST /api/lookups for every identifier over `connections` keep-alive connections."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for value in identifiers:
        queue.put_nowait(value)
    ids: list[str] = []
    statuses: dict[int, int] = {}
    retries = [0]
    failures: list[str] = []

    async def connection() -> None:
        reader = writer = None
        while not queue.empty():
            value = queue.get_nowait()
            body = b'{"identifier":"' + value.encode() + b'"}'
            request = (
                b"POST /api/lookups HTTP/1.1\r\nHost: "
                + host.encode()
                + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            for attempt in range(5):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    status_line = await reader.readline()
                    status = int(status_line.split()[1])
                    length, location, close = 0, None, False
                    while True:
                        line = await reader.readline()
                        if line in (b"\r\n", b""):
                            break
                        name, _, field = line.decode("latin-1").partition(":")
                        name = name.strip().lower()
                        if name == "content-length":
                            length = int(field)
                        elif name == "location":
                            location = field.strip()
                        elif name == "connection" and field.strip().lower() == "close":
                            close = True
                    await reader.readexactly(length)
                    if close:
                        writer.close()
                        reader = writer = None
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    retries[0] += 1
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 500 or status == 429:
                    retries[0] += 1
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                if status in (200, 202) and location:
                    ids.append(location.rsplit("/", 1)[1])
                else:
                    failures.append(f"{value}: HTTP {status}")
                break
            else:
                failures.append(f"{value}: gave up after 5 attempts")
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return {"ids": ids, "statuses": statuses, "retries": retries[0], "failures": failures}


def enqueue(url: str, identifiers: list[str], connections: int) -> dict:
    host, port = url.rsplit("//", 1)[1].split(":")
    started = time.perf_counter()
    outcome = asyncio.run(_post_all(host, int(port), identifiers, connections))
    outcome["seconds"] = time.perf_counter() - started
    return outcome


# -- state --------------------------------------------------------------------------------------


class Tracker:
    """Which lookups are complete, read in pipelined batches from the lookup records."""

    def __init__(self, app: Flask) -> None:
        self.store = services(app).lookups
        self.redis = services(app).redis
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.hget_calls = 0  # this benchmark's own reads, taken out of Valkey's command counts

    def add(self, ids: list[str]) -> None:
        with self.lock:
            self.pending.update(ids)

    def sweep(self) -> int:
        """Drop the lookups that are complete now; returns how many are still pending."""
        with self.lock:
            pending = list(self.pending)
        finished = []
        for start in range(0, len(pending), 2000):
            batch = pending[start : start + 2000]
            with self.redis.pipeline(transaction=False) as pipe:
                for lookup_id in batch:
                    pipe.hget(self.store.record_key(lookup_id), "status")
                statuses = pipe.execute()
            finished += [i for i, s in zip(batch, statuses, strict=True) if s == b"complete"]
            self.hget_calls += len(batch)
        with self.lock:
            self.pending.difference_update(finished)
            return len(self.pending)

    def records(self, ids: list[str]) -> list[list]:
        rows = []
        fields = ("status", "created_at", "completed_at", "deadline_at", *SOURCE_FIELDS)
        for start in range(0, len(ids), 2000):
            with self.redis.pipeline(transaction=False) as pipe:
                for lookup_id in ids[start : start + 2000]:
                    pipe.hmget(self.store.record_key(lookup_id), fields)
                rows += pipe.execute()
        return rows


def _kind(rest: str) -> str:
    """The kind of a key, from its name under the prefix: its family, a cache entry's type too."""
    parts = rest.split(":")
    if parts[0] == "celery":
        return "celery:" + ("task-meta" if "celery-task-meta" in rest else parts[1])
    if parts[0] == "cache" and len(parts) >= 6:
        # cache:v{schema}:g{generation}:{type}:{source}:{identifier}, cache:kept:{type}:...
        return "cache:kept" if parts[1] == "kept" else f"cache:{parts[3]}"
    return parts[0]


def memory_by_kind(client, prefix: str, samples: int = 3000, exact_up_to: int = 400_000) -> dict:
    """Bytes per kind of key: MEMORY USAGE (SAMPLES 0, exact) of every key when there are at most
    `exact_up_to`, else of random keys scaled to DBSIZE."""
    total_keys = client.dbsize()
    sizes: dict[str, list[int]] = {}
    if total_keys <= exact_up_to:
        keys = list(client.scan_iter(count=2000))
        for start in range(0, len(keys), 2000):
            chunk = keys[start : start + 2000]
            with client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.memory_usage(key, samples=0)
                used = pipe.execute()
            for key, value in zip(chunk, used, strict=True):
                text = key.decode(errors="replace")
                rest = text[len(prefix) + 1 :] if text.startswith(prefix + ":") else text
                sizes.setdefault(_kind(rest), []).append(value or 0)
        total_keys = len(keys)
    else:
        for _ in range(min(samples, total_keys)):
            key = client.randomkey()
            if key is None:
                break
            text = key.decode(errors="replace")
            rest = text[len(prefix) + 1 :] if text.startswith(prefix + ":") else text
            sizes.setdefault(_kind(rest), []).append(client.memory_usage(key, samples=0) or 0)
    sampled = sum(len(v) for v in sizes.values()) or 1
    return {
        kind: {
            "keys_estimated": round(total_keys * len(values) / sampled),
            "bytes_per_key": round(sum(values) / len(values)),
            "mib_estimated": round(total_keys * len(values) / sampled * sum(values) / len(values) / 2**20, 1),
        }
        for kind, values in sorted(sizes.items(), key=lambda item: -sum(item[1]))
    }


def record_fields(client, keys: list[str]) -> dict:
    """What a lookup record holds, field by field, over `keys` (record hashes): each field's mean
    bytes (name and value), for a source's state how much of it is the answer's data it carries,
    and how many states name a cache entry instead (`ref`)."""
    fields: dict[str, list[int]] = {}
    data: dict[str, list[int]] = {}
    used: list[int] = []
    named = carried = 0
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hgetall(key)
                pipe.memory_usage(key, samples=0)
            replies = pipe.execute()
        for record, memory_used in zip(replies[::2], replies[1::2], strict=True):
            if not record:
                continue
            used.append(memory_used or 0)
            for name, value in record.items():
                field = name.decode()
                group = "settled:*" if field.startswith("settled:") else field
                fields.setdefault(group, []).append(len(name) + len(value))
                if field.startswith("s:"):
                    state = orjson.loads(value)
                    copy = state.get("data", (state.get("entry") or {}).get("data"))
                    data.setdefault(field, []).append(len(orjson.dumps(copy)) if copy is not None else 0)
                    named += "ref" in state
                    carried += copy is not None
    return {
        "records": len(used),
        "memory_usage_per_record": round(sum(used) / len(used)) if used else None,
        "field_bytes": {
            name: {"present_in": len(values), "mean_bytes": round(sum(values) / len(values))}
            for name, values in sorted(fields.items(), key=lambda item: -sum(item[1]))
        },
        "states_naming_an_entry": named,
        "states_carrying_data": carried,
        "source_data_bytes": {
            name: round(sum(values) / len(values)) for name, values in sorted(data.items())
        },
    }


# The kinds of key kept for a lookup's retention (the rest is work in flight: queues, event logs...).
RETAINED = ("lookup", "lookups", "alias", "task", "answer", "cache:cnpj", "cache:cep", "cache:kept")


def retained_per_lookup(breakdown: dict, stats: dict, lookups: int) -> dict:
    """Bytes per lookup in the keys kept for its retention (MEMORY USAGE) plus their share of the
    keyspace's own tables (MEMORY STATS: the main and expires hash tables, per key)."""
    kinds = {kind: value for kind, value in breakdown.items() if kind in RETAINED}
    values = sum(value["keys_estimated"] * value["bytes_per_key"] for value in kinds.values())
    keys = sum(value["keys_estimated"] for value in kinds.values())
    tables = sum(stats.get("db.0", {}).values()) + stats.get("overhead.db.hashtable.lut", 0)
    per_key = tables / max(1, stats.get("keys.count", 0))
    return {
        "bytes_per_lookup": round((values + keys * per_key) / max(1, lookups)),
        "values_bytes_per_lookup": round(values / max(1, lookups)),
        "keys_per_lookup": round(keys / max(1, lookups), 2),
        "keyspace_bytes_per_key": round(per_key),
        "by_kind_bytes_per_lookup": {
            kind: round(value["keys_estimated"] * value["bytes_per_key"] / max(1, lookups))
            for kind, value in kinds.items()
        },
    }


def memory(client) -> dict:
    info = client.info("memory")
    return {"used": info["used_memory"], "peak": info["used_memory_peak"]}


def queue_lengths(client, prefix: str) -> int:
    """Messages waiting on the broker: the default queue's list at each priority step."""
    names = [f"{prefix}:celery:celery"] + [f"{prefix}:celery:celery:{step}" for step in range(1, 10)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        return sum(pipe.execute())


# -- run ----------------------------------------------------------------------------------------


def service_env(redis_url: str, sandbox_url: str, tmp: Path, env: dict) -> dict:
    """The service's environment: its own key prefix, the per-client limits off, then `env`."""
    host, port = sandbox_url.rsplit("//", 1)[1].split(":")
    return {
        # gunicorn_config.py sets it for the web processes alone (as in production)
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "REDIS_URL": redis_url,
        "KEY_PREFIX": f"s{uuid.uuid4().hex[:10]}",
        "SANDBOX_HOST": host,
        "SANDBOX_PORT": port,
        "DATA_DIR": str(tmp),
        "ADMIN_TOKEN": "bench-admin-token",
        "PYTHONUNBUFFERED": "1",
        "LOOKUP_RATE_LIMIT": "off",
        "BATCH_RATE_LIMIT": "off",
        "WORKER_METRICS_PORT": "0",  # several worker nodes on one machine
        "PORT": str(free_port()),
        **env,
    }


def start_service_with(
    tmp: Path, processes: Processes, workers: int, env: dict
) -> tuple[Service, Flask, EmbeddedRedis]:
    """Valkey, the sandbox (0 ms, quotas off), `workers` worker nodes and the web server; `env` for the service.

    Returns the deployment, an in-process app on its settings (to read its state directly; close it
    with `close_app`) and the Valkey server.
    """
    server = harness.start_redis(tmp)
    sandbox_url = harness.start_sandbox(processes, {**harness.NO_QUOTAS, "SANDBOX_LATENCY_MS": "0"})
    (tmp / "service").mkdir()
    environment = service_env(server.url, sandbox_url, tmp / "service", env)
    settings = Settings.from_env(environment)
    app = create_app(settings)
    commands = launcher.commands(settings)
    client = services(app).redis
    for number in range(1, workers + 1):
        hostname = f"w{number}@{settings.key_prefix}"
        command = list(commands["worker"])
        command[command.index("-n") + 1] = hostname
        name = f"worker{number}"
        process = processes.spawn(name, command, environment)
        wait_for(
            lambda h=hostname: client.zscore(f"{settings.key_prefix}:workers", h) is not None,
            60,
            f"worker {hostname}",
            process,
            lambda n=name: processes.log_tail(n),
        )
    web = processes.spawn("web", commands["web"], environment)
    url = f"http://{settings.host}:{settings.port}"
    wait_for(lambda: answers(f"{url}/healthz"), 30, "gunicorn web", web, lambda: processes.log_tail("web"))
    return Service(url, sandbox_url, environment, settings), app, server


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: Processes) -> dict:
        deployed, app, server = start_service_with(tmp, processes, arguments.workers, harness.NO_LIMITS)
        try:
            return measure(arguments, deployed, app)
        finally:
            processes.stop_all()
            close_app(app)
            server.stop()

    return run


def measure(arguments: argparse.Namespace, deployed: Service, app: Flask) -> dict:
    client = services(app).redis
    url = deployed.web_url
    prefix = deployed.settings.key_prefix
    identifiers = harness.valid_cnpjs(arguments.count, seed=arguments.seed)
    tracker = Tracker(app)
    timeline: list[dict] = []
    stop = threading.Event()
    t0 = time.time()

    def sample() -> None:  # progress, memory and queue depth every few seconds
        while not stop.wait(arguments.sample_interval):
            entry = {"t": round(time.time() - t0, 1), **memory(client)}
            entry["pending"] = tracker.sweep()
            entry["queued_messages"] = queue_lengths(client, prefix)
            entry["load_1m"] = round(os.getloadavg()[0], 2)
            timeline.append(entry)

    memory_before = memory(client)["used"]
    log(f"enqueueing {arguments.count:,} lookups over {arguments.connections} connections to {url}")
    sampler = threading.Thread(target=sample, daemon=True)
    enqueue_start = time.time()
    outcome = enqueue(url, identifiers, arguments.connections)
    tracker.add(outcome["ids"])
    log(
        f"enqueued {len(outcome['ids']):,} in {outcome['seconds']:.1f} s "
        f"({len(outcome['ids']) / outcome['seconds']:.0f}/s; statuses {outcome['statuses']}, "
        f"retries {outcome['retries']}, failures {len(outcome['failures'])})"
    )
    sampler.start()
    last_pending, last_progress = None, time.monotonic()
    while True:
        time.sleep(2)
        pending = timeline[-1]["pending"] if timeline else len(outcome["ids"])
        if pending != last_pending:
            last_pending, last_progress = pending, time.monotonic()
            log(
                f"  pending {pending:,}; Redis used {timeline[-1]['used'] / 2**20:.0f} MiB "
                f"(peak {timeline[-1]['peak'] / 2**20:.0f} MiB), broker messages {timeline[-1]['queued_messages']:,}"
                if timeline
                else f"  pending {pending:,}"
            )
        if pending == 0 and timeline:
            break
        if time.monotonic() - last_progress > arguments.stall:
            log(f"no progress for {arguments.stall} s: stopping with {pending:,} lookups not complete")
            break
    stop.set()
    sampler.join()
    drained_at = time.time()
    commands = client.info("commandstats")  # before this benchmark's own final reads
    cpu = client.info("cpu")
    rows = tracker.records(outcome["ids"])
    statuses: dict[str, int] = {}
    source_states: dict[str, int] = {}
    completed, created, late = [], [], 0
    for row in rows:
        status = (row[0] or b"missing").decode()
        statuses[status] = statuses.get(status, 0) + 1
        if row[1]:
            created.append(float(row[1]))
        if row[2]:
            completed.append(float(row[2]))
            if row[3] and float(row[2]) > float(row[3]):
                late += 1
        for raw in row[4:]:
            if raw:
                state = orjson.loads(raw)["state"]
                source_states[state] = source_states.get(state, 0) + 1
    final_memory = memory(client)
    breakdown = memory_by_kind(client, prefix)
    fields = record_fields(client, [tracker.store.record_key(i) for i in outcome["ids"][:2000]])
    stats = client.memory_stats()
    if "cmdstat_hget" in commands:
        commands["cmdstat_hget"]["calls"] -= tracker.hget_calls
    top_commands = sorted(commands.items(), key=lambda item: -item[1]["usec"])[:10]
    dead = client.llen(f"{prefix}:deadletters")
    accepted = len(outcome["ids"])
    first, last = (min(created), max(completed)) if created and completed else (None, None)
    drain_seconds = (last - first) if first else None
    enqueue_seconds = (max(created) - min(created)) if created else None
    # Drain rate after the enqueue: completions from the last POST to the last completion.
    last_post = max(created) if created else None  # once: inside the comprehension it was O(n²)
    after = [c for c in completed if last_post is not None and c > last_post]
    tail_seconds = (last - last_post) if last_post is not None and completed else None
    return {
        "config": {
            "lookups": arguments.count,
            "connections": arguments.connections,
            "worker_nodes": arguments.workers,
            "worker_concurrency": deployed.settings.worker_concurrency,
            "web_workers": deployed.settings.web_workers,
            "lookup_deadline": deployed.settings.lookup_deadline,
            "sandbox_latency_ms": 0,
        },
        "enqueue": {
            "accepted": accepted,
            "http_statuses": outcome["statuses"],
            "retries": outcome["retries"],
            "failures": outcome["failures"][:20],
            "failed": len(outcome["failures"]),
            "client_seconds": round(outcome["seconds"], 2),
            "per_second": round(accepted / outcome["seconds"], 1),
            "record_span_seconds": round(enqueue_seconds, 2) if enqueue_seconds else None,
        },
        "drain": {
            "complete": statuses.get("complete", 0),
            "statuses": statuses,
            "lost": accepted - statuses.get("complete", 0) + len(outcome["failures"]),
            "completed_after_their_deadline": late,
            "source_states": source_states,
            "dead_letters": dead,
            "first_post_to_last_complete_seconds": round(drain_seconds, 1) if drain_seconds else None,
            "lookups_per_second": round(len(completed) / drain_seconds, 1) if drain_seconds else None,
            "after_enqueue_completed": len(after),
            "after_enqueue_seconds": round(tail_seconds, 1) if tail_seconds else None,
            "after_enqueue_per_second": round(len(after) / tail_seconds, 1) if tail_seconds else None,
            "wall_seconds": round(drained_at - enqueue_start, 1),
        },
        "redis": {
            "used_memory_peak": final_memory["peak"],
            "used_memory_peak_mib": round(final_memory["peak"] / 2**20, 1),
            "used_memory_end_mib": round(final_memory["used"] / 2**20, 1),
            "goal_peak_bytes": GOAL_PEAK_MEMORY,
            "keys_at_end": client.dbsize(),
            "used_memory_before_mib": round(memory_before / 2**20, 1),
            "benchmark_hget_calls_excluded": tracker.hget_calls,
            "commands_per_lookup": round(sum(v["calls"] for v in commands.values()) / max(1, accepted), 1),
            "server_cpu_ms_per_lookup": round(
                (cpu["used_cpu_sys"] + cpu["used_cpu_user"]) * 1000 / max(1, accepted), 2
            ),
            "top_commands_by_time": {
                name.removeprefix("cmdstat_"): {
                    "calls_per_lookup": round(v["calls"] / max(1, accepted), 2),
                    "usec_per_call": v["usec_per_call"],
                }
                for name, v in top_commands
            },
            "by_kind_at_end": breakdown,
            "record_fields": fields,
            "retained": retained_per_lookup(breakdown, stats, len(outcome["ids"])),
            "memory_stats_at_end": {
                name: value
                for name, value in stats.items()
                if not (name.startswith("db.") and name != "db.0")
            },
        },
        "timeline": timeline,
    }


def markdown(report: dict) -> str:
    config, enqueue_, drain, redis_ = report["config"], report["enqueue"], report["drain"], report["redis"]
    accepted = enqueue_["accepted"]
    all_complete = drain["lost"] == 0 and drain["complete"] == config["lookups"]
    peak_ok = redis_["used_memory_peak"] < redis_["goal_peak_bytes"]
    yes_no = {True: "yes", False: "**no**"}
    lines = [
        harness.header(report, "Backlog: 100,000 lookups at once (`bench/backlog.py`, benchmark 5)"),
        f"{config['lookups']:,} unique valid CNPJs POSTed to `/api/lookups` as fast as the server takes them, from "
        f"this process's asyncio client over {config['connections']} keep-alive connections; the service's own "
        f"command lines and defaults (gunicorn gevent × {config['web_workers']}, {config['worker_nodes']} worker "
        f"node(s) of threads × {config['worker_concurrency']}, lookup deadline {config['lookup_deadline']:g} s), "
        "every source's rate limit and the per-client limit off; sandbox at 0 ms, quotas off; embedded Valkey "
        "without AOF. Each CNPJ lookup is three source tasks, a finalize and its deadline's finalize. "
        "Completions are read from the lookup records (`status`, `created_at`, `completed_at`). One run (a "
        "backlog this size takes many minutes; there is no baseline to repeat against).\n",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
        f"| lookups accepted (HTTP 202) | {accepted:,} of {config['lookups']:,} "
        f"({enqueue_['retries']} retried requests, statuses {enqueue_['http_statuses']}) | all | "
        f"{yes_no[accepted == config['lookups']]} |",
        f"| lookups complete | {drain['complete']:,} (statuses {drain['statuses']}) | all | {yes_no[all_complete]} |",
        f"| lookups lost | {drain['lost']:,} | 0 | {yes_no[drain['lost'] == 0]} |",
        f"| Redis `used_memory_peak` | {redis_['used_memory_peak_mib']:,} MiB (at the end: "
        f"{redis_['used_memory_end_mib']:,} MiB) | < 1,024 MiB | {yes_no[peak_ok]} |",
        f"| enqueue rate (client: all POSTs answered) | {fmt(enqueue_['per_second'])} lookups/s "
        f"({fmt(enqueue_['client_seconds'])} s) | reported | |",
        f"| drain rate (first POST → last complete) | {fmt(drain['lookups_per_second'])} lookups/s "
        f"({fmt(drain['first_post_to_last_complete_seconds'])} s) | reported | |",
        f"| drain rate after the last POST | {fmt(drain['after_enqueue_per_second'])} lookups/s "
        f"({drain['after_enqueue_completed']:,} in {fmt(drain['after_enqueue_seconds'])} s) | reported | |",
        f"| completed after their deadline (went `partial` first) | {drain['completed_after_their_deadline']:,} | "
        "| |",
        f"| source answers by state | {drain['source_states']}; dead letters {drain['dead_letters']} | | |",
    ]
    per_lookup = (redis_["used_memory_end_mib"] - redis_["used_memory_before_mib"]) * 2**10 / max(1, accepted)
    lines.append(
        f"\nAt the end Redis holds {redis_['keys_at_end']:,} keys, about {per_lookup:.1f} KiB per lookup above "
        f"the {redis_['used_memory_before_mib']} MiB it used before the first POST "
        f"(× 100,000 ≈ {per_lookup * 100_000 / 2**20:.2f} GiB). By kind (MEMORY USAGE): "
        + ", ".join(
            f"{kind} {value['mib_estimated']} MiB ({value['keys_estimated']:,} keys × {value['bytes_per_key']:,} B)"
            for kind, value in list(redis_["by_kind_at_end"].items())[:8]
        )
        + "."
    )
    retained = redis_.get("retained")
    if retained:
        lines.append(
            f"\nKept for each lookup's retention: {retained['bytes_per_lookup']:,} B in all "
            f"({retained['keys_per_lookup']} keys, at {retained['keyspace_bytes_per_key']} B each of the "
            "keyspace's tables): "
            + ", ".join(f"{kind} {value:,} B" for kind, value in retained["by_kind_bytes_per_lookup"].items())
            + "."
        )
    fields = redis_.get("record_fields")
    if fields and fields["records"]:
        data = fields["source_data_bytes"]
        lines.append(
            f"\nA lookup record takes {fields['memory_usage_per_record']:,} B (MEMORY USAGE, mean of "
            f"{fields['records']:,}; {fields.get('states_naming_an_entry', 0):,} of its sources' states name "
            f"a cache entry, {fields.get('states_carrying_data', 0):,} carry data); its fields, name and value: "
            + ", ".join(
                f"`{name}` {value['mean_bytes']:,} B"
                + (f" (its data {data[name]:,} B)" if name in data else "")
                for name, value in fields["field_bytes"].items()
            )
            + "."
        )
    lines.append(
        f"\nValkey ran {redis_['commands_per_lookup']} commands and {redis_['server_cpu_ms_per_lookup']} ms of its "
        "own CPU per lookup (INFO commandstats / cpu, whole run; the benchmark's own progress reads, "
        f"{redis_.get('benchmark_hget_calls_excluded', 0):,} HGETs, taken out of the counts but not of the CPU); by time: "
        + ", ".join(
            f"{name} {value['calls_per_lookup']}/lookup × {value['usec_per_call']} µs"
            for name, value in list(redis_["top_commands_by_time"].items())[:6]
        )
        + "."
    )
    if config["lookups"] < 100_000:
        rate = drain["lookups_per_second"]
        lines.append(
            f"\n**Not the full 100,000**: this run enqueued {config['lookups']:,}. At the drain rate "
            f"measured here ({fmt(rate)} lookups/s) the 100,000 would take about "
            f"{fmt(100_000 / rate / 60 if rate else None)} minutes, longer than the session that ran it had; "
            "`.venv/bin/python -m bench.backlog` (no `--count`) runs the full size. The memory figure scales "
            "with the lookups retained, so the per-lookup figure above is the one to extrapolate."
        )
    if per_lookup * 100_000 / 2**20 + redis_["used_memory_before_mib"] / 1024 >= 1.0:
        lines.append(
            "\nAt this size per lookup, 100,000 retained lookups would pass the 1 GiB goal. What stays is kept on "
            "purpose for the lookup retention (records and the task registry for `LOOKUP_RECORD_TTL`, two days; "
            "cache entries for their TTLs). A record names the cache entries holding its sources' answers and "
            "keeps the merged result as a patch on one of them (since issue 17); the cache entries themselves, "
            "the result's checks and the event logs of the last `EVENT_LOG_TTL_AFTER_COMPLETE` are most of the "
            "rest. Candidates: lean `complete` events, fewer fields per record."
        )
    lines.append(
        "\nWhat limits the drain rate: CPU. Every lookup costs Valkey the commands counted above (the rate "
        "limiter's bucket and start-log scripts, the breaker's admit, each source's settle and event publish, "
        "kombu's MULTI/EXEC per message), and the web and worker processes spend Python CPU on each of those "
        "round trips, on two cores shared with the sandbox, Valkey and this client (see bench/throughput.py's "
        "section for where the worker's time goes). A backlog longer than `LOOKUP_DEADLINE` also turns most "
        "lookups `partial` first, which costs a finalize and an event more; a lookup that completes before its "
        "deadline cancels that finalize."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 lookups (< 60 s)")
    parser.add_argument("--count", type=int, help="lookups to enqueue (default 100,000; quick 1,000)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive HTTP connections")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker nodes (service defaults each)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--sample-interval", type=float, default=5.0)
    parser.add_argument("--stall", type=float, default=120.0, help="give up after this long without progress")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the doc section from a saved full run")
    arguments = parser.parse_args(argv)
    if arguments.render:
        return harness.render(NAME, arguments.render, markdown)
    arguments.count = arguments.count or (1000 if arguments.quick else 100_000)
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
