"""Tests for circuit_breaker_manager: breakers shared through Redis by threads and processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor

import pybreaker
import pytest
from conftest import wait_for

from circuit_breaker_manager import (
    BreakerManager,
    BreakerOpen,
    BreakerStatus,
    BreakerUnavailable,
    CallWithdrawn,
)
from devstack.embedded_redis import free_port
from enrich import redis_store
from enrich.settings import Settings
from enrich.sources import NotFound, SourceError, TransientError, UpstreamRejected

SOURCE = "brasilapi"
SPAWN = multiprocessing.get_context("spawn")


def make_settings(base: Settings, **overrides) -> Settings:
    """The test's settings (same Redis, same key prefix) with breaker overrides."""
    return Settings.from_env({}, redis_url=base.redis_url, key_prefix=base.key_prefix, **overrides)


def server_time(client) -> float:
    seconds, microseconds = client.time()
    return seconds + microseconds / 1_000_000


def wait_for_server_time(client, moment: float) -> None:
    wait_for(lambda: server_time(client) >= moment, interval=0.005, message=f"Redis time {moment}")


def fail() -> None:
    raise TransientError("upstream is down")


def raise_error(error: Exception) -> None:
    raise error


def count(client, settings: Settings, name: str) -> int:
    return int(client.get(redis_store.key(settings, "test", name)) or 0)


class TripCounter(pybreaker.CircuitBreakerListener):
    """Counts, in Redis, the transitions to open that this process announced."""

    def __init__(self, client, key: str) -> None:
        self.client, self.key = client, key

    def state_change(self, cb, old_state, new_state) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.client.incr(self.key)


def child_process(mode, redis_url, key_prefix, overrides, threads, barriers, expected_rejections):
    """One OS process with `threads` callers sharing one BreakerManager (run with 'spawn')."""
    settings = Settings.from_env({}, redis_url=redis_url, key_prefix=key_prefix, **overrides)
    client = redis_store.connect(settings)
    manager = BreakerManager(client, settings)
    manager.breaker(SOURCE).add_listener(TripCounter(client, redis_store.key(settings, "test", "trips")))
    start, in_flight, recorded = barriers

    def bump(name: str) -> None:
        client.incr(redis_store.key(settings, "test", name))

    def failing() -> None:
        bump("invocations")
        in_flight.wait(timeout=15)  # every failing call is running before any is recorded
        raise TransientError("upstream is down")

    def probe() -> str:
        bump("invocations")
        # Hold the permit until every other caller has been turned away.
        wait_for(lambda: count(client, settings, "rejected") == expected_rejections, message="rejections")
        return "ok"

    def caller() -> None:
        start.wait(timeout=30)
        if mode == "trip":
            with pytest.raises(TransientError):
                manager.call(SOURCE, failing)
            recorded.wait(timeout=15)
            for _ in range(3):
                with pytest.raises(BreakerOpen):
                    manager.call(SOURCE, failing)
                bump("rejected")
        else:
            try:
                manager.call(SOURCE, probe)
            except BreakerOpen:
                bump("rejected")

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(caller) for _ in range(threads)]:
            future.result()  # a failed caller fails the process (non-zero exit code)
    client.close()


def start_processes(mode, settings, overrides, processes, threads, barriers, expected_rejections=0):
    started = []
    for _ in range(processes):
        arguments = (mode, settings.redis_url, settings.key_prefix, overrides, threads, barriers)
        process = SPAWN.Process(target=child_process, args=(*arguments, expected_rejections))
        process.start()
        started.append(process)
    return started


def join_processes(processes) -> None:
    for process in processes:
        process.join(timeout=40)
        if process.exitcode is None:
            process.kill()
    assert [process.exitcode for process in processes] == [0] * len(processes)


def test_calls_through_one_breaker_run_in_parallel(settings, redis_client):
    manager = BreakerManager(redis_client, settings)
    manager.breaker(SOURCE)

    def slow_call() -> str:
        time.sleep(0.2)
        return "ok"

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: manager.call(SOURCE, slow_call), range(10)))
    elapsed = time.monotonic() - started
    assert results == ["ok"] * 10
    assert elapsed < 1.0, f"10 x 200 ms calls took {elapsed:.2f}s: calls were serialized"


def test_processes_open_it_after_exactly_fail_max_failures(settings, redis_client):
    processes, threads = 3, 2
    fail_max = processes * threads  # all fail_max failing calls are in flight at once
    overrides = {"breaker_fail_max": fail_max, "breaker_reset_timeout": 60.0}
    barriers = tuple(SPAWN.Barrier(processes * threads) for _ in range(3))
    join_processes(start_processes("trip", settings, overrides, processes, threads, barriers))

    status = BreakerManager(redis_client, make_settings(settings, **overrides)).status(SOURCE)
    assert (status.state, status.failures) == ("open", fail_max)
    assert count(redis_client, settings, "invocations") == fail_max
    assert count(redis_client, settings, "rejected") == processes * threads * 3
    assert count(redis_client, settings, "trips") == 1


def test_processes_let_exactly_one_probe_through_after_reset_timeout(settings, redis_client):
    processes, threads = 3, 3
    callers = processes * threads
    overrides = {"breaker_reset_timeout": 0.3}
    barriers = (SPAWN.Barrier(callers + 1), SPAWN.Barrier(1), SPAWN.Barrier(1))
    started = start_processes("probe", settings, overrides, processes, threads, barriers, callers - 1)
    manager = BreakerManager(redis_client, make_settings(settings, **overrides))
    manager.force_open(SOURCE)
    wait_for_server_time(redis_client, manager.status(SOURCE).opened_at + 0.3)
    barriers[0].wait(timeout=30)  # every caller of every process tries at once
    join_processes(started)

    assert count(redis_client, settings, "invocations") == 1
    assert count(redis_client, settings, "rejected") == callers - 1
    assert manager.status(SOURCE).state == "closed"


def test_reset_timeout_is_kept_to_the_millisecond(settings, redis_client):
    manager = BreakerManager(redis_client, make_settings(settings, breaker_reset_timeout=1.0))
    manager.breaker(SOURCE)
    before = server_time(redis_client)
    manager.force_open(SOURCE)
    opened_at = manager.status(SOURCE).opened_at
    assert before - 0.001 <= opened_at < before + 0.1  # not truncated to whole seconds

    calls = []
    wait_for_server_time(redis_client, before + 0.8)
    with pytest.raises(BreakerOpen) as rejected:
        manager.call(SOURCE, calls.append, "at 0.8 s")
    assert rejected.value.retry_at == pytest.approx(opened_at + 1.0, abs=0.002)
    wait_for_server_time(redis_client, opened_at + 1.05)
    manager.call(SOURCE, calls.append, "at 1.05 s")
    assert calls == ["at 1.05 s"]
    assert manager.status(SOURCE).state == "closed"


def test_unreachable_redis_raises_breaker_unavailable_quickly_without_calling():
    offline = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="offline")
    manager = BreakerManager(redis_store.connect(offline), offline)
    calls = []
    started = time.monotonic()
    with pytest.raises(BreakerUnavailable) as unavailable:
        manager.call(SOURCE, calls.append, "upstream")
    assert time.monotonic() - started < 2.5
    assert calls == []
    assert unavailable.value.source == SOURCE
    with pytest.raises(BreakerUnavailable):
        manager.status(SOURCE)


def test_works_over_a_decode_responses_client(settings, redis_client):
    decoded_settings = make_settings(settings, breaker_fail_max=2, breaker_reset_timeout=0.2)
    client = redis_store.connect(decoded_settings, decode_responses=True)
    manager = BreakerManager(client, decoded_settings)
    for _ in range(2):
        with pytest.raises(TransientError):
            manager.call(SOURCE, fail)
    status = manager.status(SOURCE)
    assert (status.state, status.failures) == ("open", 2)
    assert isinstance(status.opened_at, float)
    assert manager.breaker(SOURCE).current_state == "open"
    with pytest.raises(BreakerOpen) as rejected:
        manager.call(SOURCE, fail)
    assert rejected.value.retry_at == pytest.approx(status.opened_at + 0.2, abs=0.002)

    wait_for_server_time(redis_client, status.opened_at + 0.2)
    assert manager.call(SOURCE, lambda: "probe") == "probe"
    assert manager.status(SOURCE).state == "closed"
    assert manager.breaker(SOURCE).fail_counter == 0
    client.close()


def test_final_answers_never_open_it(settings, redis_client):
    manager = BreakerManager(redis_client, make_settings(settings, breaker_fail_max=2))
    for error in [
        NotFound("no such CNPJ", 404),
        UpstreamRejected("invalid", 400),
        SourceError("gone", 410),
    ] * 3:
        with pytest.raises(SourceError) as raised:
            manager.call(SOURCE, raise_error, error)
        assert raised.value is error
    assert (manager.status(SOURCE).state, manager.status(SOURCE).failures) == ("closed", 0)

    with pytest.raises(TransientError):
        manager.call(SOURCE, fail)
    assert manager.status(SOURCE).failures == 1
    with pytest.raises(NotFound):  # the upstream answered: a run of failures ends
        manager.call(SOURCE, raise_error, NotFound("no such CNPJ", 404))
    assert manager.status(SOURCE).failures == 0


def test_status_all_reports_every_source(settings, redis_client):
    manager = BreakerManager(redis_client, settings)
    with pytest.raises(TransientError):
        manager.call("receitaws", fail)
    statuses = manager.status_all()
    assert set(statuses) == set(settings.sources)
    for name, status in statuses.items():
        source = settings.sources[name]
        assert status == BreakerStatus(
            name=name,
            state="closed",
            failures=1 if name == "receitaws" else 0,
            successes=0,
            opened_at=None,
            fail_max=source.breaker_fail_max,
            reset_timeout=source.breaker_reset_timeout,
            success_threshold=source.breaker_success_threshold,
        )
    assert json.loads(json.dumps(statuses["receitaws"].to_dict()))["failures"] == 1
    with pytest.raises(KeyError, match="unknown source 'nope'"):
        manager.status("nope")


def test_force_open_and_reset(settings, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="breakers")
    manager = BreakerManager(redis_client, settings)
    with pytest.raises(TransientError):
        manager.call(SOURCE, fail)
    calls = []
    manager.force_open(SOURCE)
    status = manager.status(SOURCE)
    assert status.state == "open" and status.opened_at is not None
    with pytest.raises(BreakerOpen) as rejected:
        manager.call(SOURCE, calls.append, "while open")
    assert rejected.value.source == SOURCE
    assert rejected.value.retry_at == pytest.approx(status.opened_at + status.reset_timeout)

    manager.reset(SOURCE)
    status = manager.status(SOURCE)
    assert (status.state, status.failures, status.successes, status.opened_at) == ("closed", 0, 0, None)
    manager.call(SOURCE, calls.append, "after reset")
    assert calls == ["after reset"]
    messages = [record.getMessage() for record in caplog.records if record.name == "breakers"]
    assert messages == [f"breaker {SOURCE}: closed -> open", f"breaker {SOURCE}: open -> closed"]


def test_an_open_breaker_refuses_calls_with_an_error_naming_its_source(settings, redis_client):
    manager = BreakerManager(redis_client, settings)
    assert manager.call(SOURCE, lambda: "live") == "live"
    manager.force_open(SOURCE)
    with pytest.raises(BreakerOpen) as refused:
        manager.call(SOURCE, lambda: "live")
    assert refused.value.source == SOURCE


def test_success_threshold_two_needs_two_probe_successes(settings, redis_client):
    manager = BreakerManager(
        redis_client, make_settings(settings, breaker_success_threshold=2, breaker_reset_timeout=0.2)
    )
    manager.force_open(SOURCE)
    wait_for_server_time(redis_client, manager.status(SOURCE).opened_at + 0.2)

    def first_probe() -> str:
        with pytest.raises(BreakerOpen):  # the one permit is taken while this probe runs
            manager.call(SOURCE, lambda: "concurrent")
        return "first"

    assert manager.call(SOURCE, first_probe) == "first"
    status = manager.status(SOURCE)
    assert (status.state, status.successes) == ("half-open", 1)
    assert manager.call(SOURCE, lambda: "second") == "second"
    assert manager.status(SOURCE).state == "closed"


def test_failed_probe_reopens_with_a_new_opened_at(settings, redis_client):
    manager = BreakerManager(redis_client, make_settings(settings, breaker_reset_timeout=0.2))
    manager.force_open(SOURCE)
    first_opened_at = manager.status(SOURCE).opened_at
    wait_for_server_time(redis_client, first_opened_at + 0.2)
    with pytest.raises(TransientError):
        manager.call(SOURCE, fail)
    status = manager.status(SOURCE)
    assert status.state == "open" and status.opened_at >= first_opened_at + 0.2
    with pytest.raises(BreakerOpen):
        manager.call(SOURCE, fail)


def test_a_crashed_probers_permit_expires(settings, redis_client):
    manager = BreakerManager(redis_client, make_settings(settings, breaker_reset_timeout=0.2))
    breaker = manager.breaker(SOURCE)
    breaker.permit_ttl = 0.3
    manager.force_open(SOURCE)
    wait_for_server_time(redis_client, manager.status(SOURCE).opened_at + 0.2)
    # A prober that takes the permit and dies before recording anything:
    assert breaker.storage.run("admit", breaker.reset_timeout, 1, breaker.permit_ttl, "crashed")[0] == "probe"
    with pytest.raises(BreakerOpen) as rejected:
        manager.call(SOURCE, fail)
    wait_for_server_time(redis_client, rejected.value.retry_at)
    assert manager.call(SOURCE, lambda: "probe") == "probe"
    assert manager.status(SOURCE).state == "closed"


def test_a_withdrawn_call_counts_for_nothing_and_gives_its_probe_permit_back(settings, redis_client):
    manager = BreakerManager(redis_client, make_settings(settings, breaker_reset_timeout=0.2))
    manager.force_open(SOURCE)
    wait_for_server_time(redis_client, manager.status(SOURCE).opened_at + 0.2)

    def withdraw() -> None:
        raise CallWithdrawn("rate limit: not now")

    with pytest.raises(CallWithdrawn):
        manager.call(SOURCE, withdraw)  # the probe that decided not to go out
    status = manager.status(SOURCE)
    assert (status.state, status.successes) == ("half-open", 0)
    assert manager.call(SOURCE, lambda: "probe") == "probe"  # the permit is free again at once
    assert manager.status(SOURCE).state == "closed"
    with pytest.raises(CallWithdrawn):
        manager.call(SOURCE, withdraw)
    assert manager.status(SOURCE).failures == 0


class Transitions(pybreaker.CircuitBreakerListener):
    """The state changes one breaker announced, as (old, new) names."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def state_change(self, cb, old_state, new_state) -> None:
        self.seen.append((old_state.name, new_state.name))


def test_the_decorator_and_the_with_block_go_through_the_shared_state(settings, redis_client):
    manager = BreakerManager(redis_client, make_settings(settings, breaker_fail_max=3))
    breaker = manager.breaker(SOURCE)

    @breaker  # pybreaker's decorator calls breaker.call
    def decorated() -> None:
        raise TransientError("upstream is down")

    with pytest.raises(TransientError):
        decorated()
    assert manager.status(SOURCE).failures == 1
    with pytest.raises(TransientError), breaker.calling():
        raise TransientError("upstream is down")
    assert manager.status(SOURCE).failures == 2
    with breaker.calling():
        pass
    assert manager.status(SOURCE).failures == 0

    body = []
    breaker.open()
    with pytest.raises(BreakerOpen), breaker.calling():
        body.append("ran")
    assert body == []


def test_reading_the_state_announces_nothing_and_keeps_the_counters(settings, redis_client):
    overrides = {"breaker_fail_max": 3}
    here = BreakerManager(redis_client, make_settings(settings, **overrides)).breaker(SOURCE)
    transitions = Transitions()
    here.add_listener(transitions)
    elsewhere = BreakerManager(redis_client, make_settings(settings, **overrides))
    with pytest.raises(TransientError):
        elsewhere.call(SOURCE, fail)
    elsewhere.force_open(SOURCE)  # another process's change

    assert isinstance(here.state, pybreaker.CircuitOpenState)
    assert (here.current_state, here.fail_counter) == ("open", 1)
    assert transitions.seen == []  # announced once, by the process that made it
    here.half_open()
    assert isinstance(here.state, pybreaker.CircuitHalfOpenState)
    assert transitions.seen == [("open", "half-open")]


def test_state_changes_only_through_the_scripts(settings, redis_client):
    breaker = BreakerManager(redis_client, settings).breaker(SOURCE)
    storage = breaker.storage
    for write in [
        storage.increment_counter,
        storage.reset_counter,
        storage.increment_success_counter,
        storage.reset_success_counter,
        lambda: setattr(storage, "state", "open"),
        lambda: setattr(storage, "opened_at", None),
    ]:
        with pytest.raises(NotImplementedError):
            write()
    with pytest.raises(NotImplementedError):
        breaker.call_async(lambda: "tornado")
    keys = [redis_store.key(settings, "breaker", SOURCE, part) for part in ("state", "probes")]
    assert redis_client.exists(*keys) == 0  # building the breaker wrote nothing
