"""The cluster-wide token bucket: reservations, horizon, and many processes sharing one bucket."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from enrich import redis_store
from enrich.rate_limiter import RateLimiter
from enrich.settings import Settings


def _limiter(redis_url: str, prefix: str, rate: float, burst: int = 1, reserve: int = 0) -> RateLimiter:
    """A limiter whose bucket holds `burst` + `reserve` tokens (BATCH_TOKEN_RESERVE).

    The bucket's own arithmetic is tested with no reserve; the reserve has tests of its own below.
    """
    settings = Settings.from_env(
        {"RATE_LIMIT_RECEITAWS": str(rate), "RATE_BURST_RECEITAWS": str(burst)},
        redis_url=redis_url,
        key_prefix=prefix,
        batch_token_reserve=reserve,
    )
    return RateLimiter(redis_store.connect(settings), settings)


@pytest.fixture
def limiter(settings, redis_client) -> RateLimiter:
    return _limiter(settings.redis_url, settings.key_prefix, rate=60)


@pytest.fixture
def reserving(settings, redis_client) -> RateLimiter:
    """60 a minute, burst 1, two tokens kept for interactive lookups: the bucket holds 3."""
    return _limiter(settings.redis_url, settings.key_prefix, rate=60, reserve=2)


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


def test_a_full_bucket_holds_the_burst_and_the_interactive_reserve(reserving):
    assert reserving.capacity("receitaws") == 3
    assert reserving.tokens("receitaws") == pytest.approx(3.0)
    waits = [reserving.reserve("receitaws").wait for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and 0.9 < waits[3] <= 1.0  # interactive calls use all of it


def test_batch_calls_leave_the_reserve_to_interactive_ones(reserving):
    first = reserving.reserve("receitaws", batch=True)
    assert first.granted and first.wait == 0  # 3 -> 2 tokens
    held = reserving.reserve("receitaws", batch=True)
    assert not held.granted and held.held  # taking one more would leave fewer than 2
    assert 0.9 < held.wait <= 1.0  # when the bucket next holds 3 (one token a second)
    assert reserving.tokens("receitaws") == pytest.approx(2.0, abs=0.05)  # a held call takes nothing
    # An interactive lookup arriving now finds the reserve at once, twice.
    assert [reserving.reserve("receitaws").wait for _ in range(2)] == [0.0, 0.0]


def test_batch_calls_never_reserve_ahead(reserving):
    for _ in range(5):
        reserving.reserve("receitaws")  # interactive calls: 3 now, 2 reserved ahead
    held = reserving.reserve("receitaws", batch=True)
    assert held.held and not held.granted
    assert 4.9 < held.wait <= 5.0  # from -2 tokens back to 3
    assert reserving.reserve("receitaws").wait == pytest.approx(3.0, abs=0.05)  # nothing was taken


def test_with_no_reserve_a_batch_call_takes_the_last_token_but_never_one_ahead(settings, redis_client):
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":none", rate=60, reserve=0)
    assert limiter.reserve("receitaws", batch=True).granted
    held = limiter.reserve("receitaws", batch=True)
    assert held.held and 0.9 < held.wait <= 1.0


def test_the_log_of_starts_ignores_the_reserve(settings, redis_client):
    """The reserve makes the bucket bigger, not the upstream's share: 3 a minute with burst 1 still
    starts at most 3 + 1 calls in a minute, and a fractional 2.85 at most 2 + 1."""
    for rate, allowed in ((3, 4), (2.85, 3)):
        limiter = _limiter(settings.redis_url, f"{settings.key_prefix}:{rate}", rate=rate, reserve=4)
        started = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            wait = limiter.admit("receitaws")
            if wait > 1.0:
                break  # the minute is full
            if wait == 0:
                started += 1
            else:
                time.sleep(wait)  # the limiter's own answer says when to come back
        assert started == allowed, rate


def test_the_bucket_has_room_for_a_dispatcher_rounds_refill_above_the_reserve(settings, redis_client):
    """A held batch call asks again once a DEFERRED_POLL_INTERVAL (0.2 s): at 10 a second a round
    refills 2 tokens, and the bucket keeps them above the reserve for the batch's next round."""
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":room", rate=600, reserve=2)
    assert limiter.capacity("receitaws") == 1 + 2 + 2
    taken = [limiter.reserve("receitaws", batch=True) for _ in range(4)]
    assert [r.granted for r in taken] == [True, True, True, False] and taken[3].held


def test_batch_calls_leave_the_reserve_in_the_log_of_starts_too(settings, redis_client):
    """10 a second with burst 1: 11 starts fit in any second, 9 of them for batch calls; the other
    two are a person's even while a batch uses the source's whole rate."""
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":starts", rate=600, reserve=2)
    assert [limiter.admit("receitaws", batch=True) for _ in range(9)] == [0.0] * 9
    assert limiter.admit("receitaws", batch=True) > 0  # the batch's share of this second is used
    assert [limiter.admit("receitaws") for _ in range(2)] == [0.0, 0.0]  # a person's are not
    assert limiter.admit("receitaws") > 0
