"""The broker's lost-task window: a worker SIGKILLed between taking a message and recording it.

kombu's Redis transport pops a message with BRPOP and records it as unacknowledged in a second
command (celery/kombu#305); redis_broker.py takes and records in one script.  A test-only fault
point (BROKER_TAKE_PAUSE) widens the gap between taking a message and running it, and logs when
a worker is inside it; the test kills the worker right then, again and again, while tasks keep
arriving, and counts the tasks that never ran.  On kombu's own take the count is the number of
kills (the first test shows the fault point reaches the window); on the project's it is 0.
"""

from __future__ import annotations

import random
import signal
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from enrich import redis_broker
from enrich.celery_setup import LookupCelery
from enrich.services import services

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
PAUSE_LINE = b"BROKER_TAKE_PAUSE: pausing"
CELERY = str(Path(sys.executable).parent / "celery")


def _kill_in_the_window(make_stack, kills: int, stock: bool, per_kill: int = 5) -> dict:
    """Send tasks, kill `kills` workers each inside the window while a worker never killed competes
    for every message (tokens taken by one and messages by the other), drain; count."""
    stack = make_stack(VISIBILITY_TIMEOUT="2", PROBE_STOCK_TAKE="1" if stock else "0")
    client = services(stack.app).redis
    done_key = f"{stack.settings.key_prefix}:probe:done"
    celery = LookupCelery(stack.settings)
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            celery.send_task("probe.note", args=[sent], priority=random.randint(0, 9))
            sent += 1

    def worker(name: str, pause: str):
        stack.env["BROKER_TAKE_PAUSE"] = pause
        command = [CELERY, "-A", "broker_probe", "worker", "-P", "threads", "-c", "4", "-n", f"{name}@probe"]
        command += ["--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        return stack._spawn(name, command)

    stack.env["PYTHONPATH"] = str(HERE)  # workers start in the repository's root; the probe app lives here
    send(100)
    worker("survivor", "0.5")
    for kill in range(kills):
        process = worker(f"killed{kill}", "0.5")
        log = stack.processes[f"killed{kill}"][1]

        def in_window(log=log, process=process) -> bool:
            return PAUSE_LINE in log.read_bytes() or process.poll() is not None

        wait_for(in_window, 60, message="a worker inside the window")
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        send(per_kill)  # tasks keep arriving between the kills

    worker("drain", "0")
    lists = redis_broker.priority_lists(stack.settings.key_prefix)
    unacked = redis_broker.broker_prefix(stack.settings.key_prefix) + "unacked"

    def settled() -> bool:
        queued = sum(client.llen(name) for name in lists)
        return queued == 0 and client.hlen(unacked) == 0 and client.scard(done_key) > 0

    try:
        if stock:
            wait_for(settled, 90, message="the queues and the unacked index empty")
        else:
            wait_for(lambda: client.scard(done_key) == sent, 90, message=f"all {sent} tasks run")
    finally:
        celery.close()
    return {"sent": sent, "ran": client.scard(done_key), "lost": sent - client.scard(done_key)}


def test_on_kombus_own_take_a_worker_killed_in_the_window_loses_its_task(make_stack):
    outcome = _kill_in_the_window(make_stack, kills=3, stock=True)
    print(f"kombu's take: {outcome['lost']} of {outcome['sent']} tasks lost over 3 kills")
    assert outcome["lost"] >= 1, outcome


def test_the_atomic_take_loses_no_task_over_twenty_kills_under_load(make_stack):
    outcome = _kill_in_the_window(make_stack, kills=20, stock=False)
    print(f"atomic take: {outcome['lost']} of {outcome['sent']} tasks lost over 20 kills")
    assert outcome["lost"] == 0, outcome
