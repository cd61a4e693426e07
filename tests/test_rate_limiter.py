"""The cluster-wide token bucket: reservations, horizon, and many processes sharing one bucket."""

from __future__ import annotations

import multiprocessing
import time

import pytest

import redis_store
from rate_limiter import RateLimiter
from settings import Settings


def _limiter(redis_url: str, prefix: str, rate: float, burst: int = 1) -> RateLimiter:
    settings = Settings.from_env(
        {"RATE_LIMIT_RECEITAWS": str(rate), "RATE_BURST_RECEITAWS": str(burst)},
        redis_url=redis_url,
        key_prefix=prefix,
    )
    return RateLimiter(redis_store.connect(settings), settings)


@pytest.fixture
def limiter(settings, redis_client) -> RateLimiter:
    return _limiter(settings.redis_url, settings.key_prefix, rate=60)


def test_first_call_is_granted_at_once(limiter):
    reservation = limiter.reserve("receitaws")
    assert reservation.granted and reservation.wait == 0


def test_empty_bucket_reserves_the_next_token(limiter):
    limiter.reserve("receitaws")
    second = limiter.reserve("receitaws")
    third = limiter.reserve("receitaws")
    assert second.granted and 0.9 < second.wait <= 1.0  # 60/min: one token a second
    assert third.granted and 1.9 < third.wait <= 2.0


def test_reservation_past_the_horizon_is_refused_and_reserves_nothing(limiter):
    limiter.reserve("receitaws")
    refused = limiter.reserve("receitaws", horizon=0.5)
    assert not refused.granted and refused.wait > 0.5
    assert limiter.reserve("receitaws").wait < 1.01  # the refused call took no slot


def test_tokens_refill_at_the_rate(limiter):
    limiter.reserve("receitaws")
    assert limiter.tokens("receitaws") < 0.1
    deadline = time.monotonic() + 1.1
    while time.monotonic() < deadline:
        time.sleep(0.05)
    assert limiter.tokens("receitaws") == pytest.approx(1.0)


def test_status_reports_every_source(limiter):
    status = limiter.status_all()
    assert set(status) == {"brasilapi", "receitaws", "opencnpj", "viacep"}
    assert status["receitaws"]["rate_per_minute"] == 60


def _grab(redis_url: str, prefix: str, count: int, queue) -> None:
    limiter = _limiter(redis_url, prefix, rate=600, burst=5)
    granted_at = []
    for _ in range(count):
        reservation = limiter.reserve("receitaws", horizon=60)
        granted_at.append(time.time() + reservation.wait)
    queue.put(granted_at)


def test_processes_sharing_a_bucket_never_exceed_it(settings, redis_client):
    """Three processes reserve 30 calls each from a 10/s bucket (burst 5): the calls' scheduled
    times, merged, never put more than burst + rate * window calls in any window."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_grab, args=(settings.redis_url, settings.key_prefix, 30, queue))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    times = sorted(t for _ in workers for t in queue.get(timeout=60))
    for worker in workers:
        worker.join(30)
    assert len(times) == 90
    rate, burst = 10.0, 5
    for i, start in enumerate(times):
        for window in (0.5, 1.0, 3.0):
            inside = sum(1 for t in times[i:] if t < start + window)
            assert inside <= burst + rate * window + 1e-6, (window, inside)
    # and the whole run took as long as the bucket says, not less
    assert times[-1] - times[0] >= (90 - burst) / rate - 0.2


def test_calls_that_turn_up_together_are_paced_by_the_log_of_starts(limiter):
    """Calls that all turn up at once (late reserved ones) may not start together: 60/min with
    burst 1 allows ceil(1/s) + 1 = 2 starts in any second; the third waits for the oldest to age out."""
    assert limiter.admit("receitaws") == 0
    assert limiter.admit("receitaws") == 0
    wait = limiter.admit("receitaws")
    assert 0 < wait <= 1.0


def test_per_minute_window_caps_starts_beyond_the_per_second_one(settings, redis_client):
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":minute", rate=3, burst=1)
    # 3/min with burst 1: at most 1 + 1 = 2 a second and 3 + 1 = 4 a minute.
    started = 0
    deadline = time.monotonic() + 10
    while started < 4 and time.monotonic() < deadline:
        wait = limiter.admit("receitaws")
        if wait == 0:
            started += 1
        else:
            assert wait <= 1.0
            time.sleep(wait)  # the limiter's own answer says when to come back
    assert started == 4
    wait = limiter.admit("receitaws")
    assert wait > 50  # the minute is full: the oldest start ages out about 60 s after it
