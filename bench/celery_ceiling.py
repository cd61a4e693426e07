"""The Celery ceiling: no-op task round trips on the service's own broker and worker settings.

The most any Celery-based design can do on this machine (issue 5, baseline b).  One worker node
runs `bench/baselines/celery_noop.py` (job_queue's configuration plus a task that only increments
a Redis counter); this process sends N tasks as fast as one producer can and waits until the
counter says all N ran.  Pools: threads with the service's default concurrency, with and without
the Redis result backend, and prefork x 2 for reference.

    .venv/bin/python -m bench.celery_ceiling            # 4,000 tasks x 3 repeats per pool
    .venv/bin/python -m bench.celery_ceiling --quick    # 1,000 tasks x 1 (< 60 s)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import psutil
import redis

from bench import harness
from bench.harness import BIN, Processes, cell, fmt, log, spread, wait_for
from enrich.celery_setup import LookupCelery
from enrich.settings import Settings

NAME = "celery_ceiling"
TASK = "bench.noop"
# What the issue measured once on this machine (tasks/s: with the result backend, without).
ISSUE = {"prefork x 2": (530, 890), "threads x 8": (430, 680)}


def pools(default_concurrency: int) -> list[dict]:
    threads = f"threads x {default_concurrency}"
    return [
        {"label": threads, "pool": "threads", "concurrency": default_concurrency, "results": True},
        {"label": threads, "pool": "threads", "concurrency": default_concurrency, "results": False},
        {"label": "threads x 8", "pool": "threads", "concurrency": 8, "results": True},
        {"label": "threads x 8", "pool": "threads", "concurrency": 8, "results": False},
        {"label": "prefork x 2", "pool": "prefork", "concurrency": 2, "results": True},
        {"label": "prefork x 2", "pool": "prefork", "concurrency": 2, "results": False},
    ]


def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds (user + system) of a process and its children."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure_pool(config: dict, redis_url: str, processes: Processes, tasks: int, repeats: int, loglevel: str):
    prefix = f"c{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "KEY_PREFIX": prefix,
        "PYTHONUNBUFFERED": "1",
        "BENCH_NO_RESULTS": "0" if config["results"] else "1",
    }
    settings = Settings.from_env(env)
    producer = LookupCelery(settings)
    if not config["results"]:
        producer.conf.update(result_backend=None, task_ignore_result=True, task_track_started=False)
    client = redis.Redis.from_url(settings.effective_redis_url)  # the producer only sends, and counts here
    counter = f"{prefix}:bench:noop:done"
    name = f"worker-{config['pool']}{config['concurrency']}-{'results' if config['results'] else 'noresults'}"
    worker = processes.spawn(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "bench.baselines.celery_noop",
            "worker",
            "-P",
            config["pool"],
            "-c",
            str(config["concurrency"]),
            "-n",
            f"ceiling@{prefix}",
            "--loglevel",
            loglevel,
        ],
        env,
    )
    try:

        def done() -> int:
            return int(client.get(counter) or 0)

        for _ in range(50):  # warm up: the worker is ready once these ran
            producer.send_task(TASK, priority=5)
        wait_for(
            lambda: done() >= 50,
            60,
            f"{name} to run its warm-up tasks",
            worker,
            lambda: processes.log_tail(name),
        )
        runs = []
        process = psutil.Process(worker.pid)
        for repeat in range(repeats):
            client.delete(counter)
            cpu_before = tree_cpu(process)
            started = time.perf_counter()
            for _ in range(tasks):
                producer.send_task(TASK, priority=5)
            sent = time.perf_counter()
            wait_for(
                lambda: done() >= tasks, 600, f"{tasks} no-op tasks", worker, lambda: processes.log_tail(name)
            )
            finished = time.perf_counter()
            cpu = tree_cpu(process) - cpu_before
            run = {
                "tasks": tasks,
                "send_seconds": round(sent - started, 3),
                "total_seconds": round(finished - started, 3),
                "sent_per_second": round(tasks / (sent - started), 1),
                "completed_per_second": round(tasks / (finished - started), 1),
                "worker_cpu_ms_per_task": round(cpu * 1000 / tasks, 3),
            }
            log(
                f"  {config['label']} {'with' if config['results'] else 'without'} results, run {repeat + 1}: "
                f"sent {run['sent_per_second']}/s, completed {run['completed_per_second']}/s, "
                f"worker CPU {run['worker_cpu_ms_per_task']} ms/task"
            )
            runs.append(run)
    finally:
        processes.stop(name)
        client.close()
    return {
        **config,
        "runs": runs,
        "sent_per_second": spread([r["sent_per_second"] for r in runs]),
        "completed_per_second": spread([r["completed_per_second"] for r in runs]),
        "worker_cpu_ms_per_task": spread([r["worker_cpu_ms_per_task"] for r in runs]),
    }


def body(arguments: argparse.Namespace):
    def run(tmp: Path, processes: Processes) -> dict:
        server = harness.start_redis(tmp)
        try:
            default_concurrency = Settings.from_env().worker_concurrency
            results = []
            for config in pools(default_concurrency):
                log(f"{config['label']} {'with' if config['results'] else 'without'} the result backend")
                results.append(
                    measure_pool(
                        config, server.url, processes, arguments.tasks, arguments.repeats, arguments.loglevel
                    )
                )
        finally:
            processes.stop_all()
            server.stop()
        return {
            "config": {
                "tasks": arguments.tasks,
                "repeats": arguments.repeats,
                "worker_loglevel": arguments.loglevel,
                "service_worker_concurrency": default_concurrency,
            },
            "issue_reference": ISSUE,
            "pools": results,
        }

    return run


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        harness.header(report, "Celery ceiling: no-op task round trips (`bench/celery_ceiling.py`)"),
        f"One worker node of `bench/baselines/celery_noop.py`: `enrich.celery_setup.LookupCelery`'s own configuration "
        f"(Redis broker with priorities and the service's key prefix, acks late, prefetch 1, track started, "
        f"extended results, log level {config['worker_loglevel']}) plus a task that only increments a Redis "
        f"counter. This process sends {config['tasks']:,} tasks at once from one producer thread and waits until "
        f"the counter reaches {config['tasks']:,}; median of {config['repeats']} run(s), (min–max). "
        "Sent and completed are both counted from the first send, so completed/s is the round-trip ceiling.\n",
        "| pool | result backend | sent tasks/s | completed tasks/s | worker CPU ms/task | issue (measured once) | ratio to issue |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool in report["pools"]:
        issue = report["issue_reference"].get(pool["label"])
        reference = None if issue is None else issue[0 if pool["results"] else 1]
        median = pool["completed_per_second"]["median"]
        lines.append(
            f"| {pool['label']} | {'Redis' if pool['results'] else 'none'} | {cell(pool['sent_per_second'], 0)} "
            f"| {cell(pool['completed_per_second'], 0)} | {cell(pool['worker_cpu_ms_per_task'], 2)} "
            f"| {fmt(reference) if reference else 'n/a (issue: threads x 8)'} "
            f"| {fmt(median / reference, 2) if reference and median else 'n/a'} |"
        )
    threads = [p for p in report["pools"] if p["concurrency"] == config["service_worker_concurrency"]]
    if threads:
        with_results = threads[0]["completed_per_second"]["median"]
        lines.append(
            f"\nThe service's configuration (threads x {config['service_worker_concurrency']}, Redis results) "
            f"tops out at about **{fmt(with_results)} no-op tasks/s** on this machine: the ceiling against which "
            "benchmark 3 compares its source calls per second (goal: at least half of it). A no-op task costs the "
            "worker the CPU shown above; the broker's own work (Valkey) comes on top, on the same two cores."
        )
    by_label = {(p["label"], p["results"]): p["completed_per_second"]["median"] for p in report["pools"]}
    default = f"threads x {config['service_worker_concurrency']}"
    if by_label.get((default, True)) and by_label.get(("threads x 8", True)):
        lines.append(
            f"\nThreads × {config['service_worker_concurrency']} (the service's default) completes "
            f"{fmt(by_label[(default, True)] / by_label[('threads x 8', True)], 2)}× what threads × 8 does with "
            "results: with nothing to wait for, more threads only add GIL and broker contention to one process. "
            "The result backend costs a third or more of the ceiling (a SET of the extended result and, with "
            "`task_track_started`, a STARTED write before it). The prefork figures fall short of the issue's: "
            "the producer, the pool and Valkey share two cores with whatever else runs (see the load average "
            "above: other sessions' tests and benchmarks ran at the same time), and prefork's parent process "
            "relays every task to its children over pipes."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 tasks, one run per pool (< 60 s)")
    parser.add_argument("--tasks", type=int, help="tasks per run (default 4,000; quick 1,000)")
    parser.add_argument("--repeats", type=int, help="runs per pool (default 3; quick 1)")
    parser.add_argument("--loglevel", default="INFO", help="worker log level (the service runs INFO)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the doc section from a saved full run")
    arguments = parser.parse_args(argv)
    if arguments.render:
        return harness.render(NAME, arguments.render, markdown)
    arguments.tasks = arguments.tasks or (1000 if arguments.quick else 4000)
    arguments.repeats = arguments.repeats or (1 if arguments.quick else 3)
    return harness.run_benchmark(NAME, arguments.quick, argv, body(arguments), markdown)


if __name__ == "__main__":
    sys.exit(main())
