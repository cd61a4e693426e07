"""The cluster-wide token bucket: reservations, horizon, and many processes sharing one bucket."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from enrich import redis_store
from enrich.feature_flags import FeatureFlags
from enrich.rate_limiter import PACE_HEADROOM, RateLimiter, RedisClock
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


def _redis_now(limiter: RateLimiter) -> float:
    seconds, micros = limiter.redis.time()
    return seconds + micros / 1e6


def _slots(limiter: RateLimiter, source: str = "receitaws") -> list[float]:
    """The send slots in `source`'s log, oldest first (Redis time)."""
    key = redis_store.key(limiter.settings, "ratelimit", source, "starts")
    return [score for _, score in limiter.redis.zrange(key, 0, -1, withscores=True)]


def _fill(limiter: RateLimiter, *ago: float, source: str = "receitaws") -> None:
    """Send slots taken `ago` seconds before now, as calls gone out earlier left them."""
    key = redis_store.key(limiter.settings, "ratelimit", source, "starts")
    now = _redis_now(limiter)
    limiter.redis.zadd(key, {f"earlier {n}": now - seconds for n, seconds in enumerate(ago)})


def test_send_slots_after_the_burst_follow_one_another_a_gap_apart(settings, redis_client):
    """10 a second with burst 1: rate + burst = 11 sends in any second.  Slots come on an even pace
    a little faster than that (PACE_HEADROOM), the burst at once; the widened second (1 s + 0.09 s)
    holds 11, so the twelfth's slot is past it, further than a call sleeps, and it is not taken."""
    limiter = _limiter(settings.redis_url, settings.key_prefix, rate=600)
    pacing = limiter.pacing("receitaws")
    assert (pacing.per_second, pacing.widen) == (11, pytest.approx(0.09))
    assert pacing.gap == pytest.approx(1 / (11 * PACE_HEADROOM))
    slots = [limiter.send_slot("receitaws") for _ in range(12)]
    assert all(slot.taken for slot in slots[:11]) and not slots[11].taken
    assert slots[0].wait == slots[1].wait == 0  # the burst goes at once
    for number, slot in enumerate(slots[2:11], start=1):  # then one a gap after another
        assert slot.at - slots[0].at == pytest.approx(number * pacing.gap, abs=1e-5)
    assert slots[11].wait == pytest.approx(1.09 - (slots[11].now - slots[0].now), abs=1e-3)
    assert len(_slots(limiter)) == 11  # the refused call took nothing


def test_a_call_sent_ahead_of_its_token_takes_no_send_slot_before_the_tokens_time(settings, redis_client):
    """A call waiting for its token is sent SEND_LEAD ahead of it (pipeline); its send slot is no
    earlier than the token's time, so the wire never runs ahead of the bucket, and the next call's
    slot comes after it."""
    limiter = _limiter(settings.redis_url, settings.key_prefix, rate=600)
    token_at = time.time() + 0.3
    ahead = limiter.send_slot("receitaws", not_before=token_at)
    assert ahead.taken and ahead.wait == pytest.approx(0.3, abs=0.02)
    assert limiter.clock.local(ahead.at) >= token_at
    assert limiter.send_slot("receitaws").at >= ahead.at  # slots stay in order
    too_far = limiter.send_slot("receitaws", not_before=time.time() + 5)
    assert not too_far.taken and too_far.wait > 4  # deferred (keeping its token), not slept through


def test_the_widened_minute_caps_sends_beyond_the_second(settings, redis_client):
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":minute", rate=3, burst=1)
    # 3/min with burst 1: at most 3 + 1 = 4 a minute, widened by half a second (the gap).
    assert limiter.pacing("receitaws").widen == pytest.approx(0.5)
    _fill(limiter, 50, 40, 30)
    assert limiter.send_slot("receitaws").wait == 0  # the fourth of the minute
    refused = limiter.send_slot("receitaws")
    assert not refused.taken and refused.wait == pytest.approx(10.5, abs=0.05)  # 50 s ago + 60.5 s


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


def test_the_send_slots_ignore_the_reserve(settings, redis_client):
    """The reserve makes the bucket bigger, not the upstream's share: 3 a minute with burst 1 still
    sends at most 3 + 1 calls in a minute, and a fractional 2.85 at most 2 + 1."""
    for rate, allowed in ((3, 4), (2.85, 3)):
        limiter = _limiter(settings.redis_url, f"{settings.key_prefix}:{rate}", rate=rate, reserve=4)
        _fill(limiter, *range(50, 50 - 5 * (allowed - 1), -5))
        assert limiter.send_slot("receitaws").taken, rate
        assert not limiter.send_slot("receitaws").taken, rate


def test_the_bucket_has_room_for_a_dispatcher_rounds_refill_above_the_reserve(settings, redis_client):
    """A held batch call asks again once a DEFERRED_POLL_INTERVAL (0.2 s): at 10 a second a round
    refills 2 tokens, and the bucket keeps them above the reserve for the batch's next round."""
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":room", rate=600, reserve=2)
    assert limiter.capacity("receitaws") == 1 + 2 + 2
    taken = [limiter.reserve("receitaws", batch=True) for _ in range(4)]
    assert [r.granted for r in taken] == [True, True, True, False] and taken[3].held


def test_batch_calls_leave_the_reserve_in_the_send_slots_too(settings, redis_client):
    """10 a second with burst 1: 11 sends fit in any second, 9 of them for batch calls; the other
    two are a person's even while a batch uses the source's whole rate."""
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":starts", rate=600, reserve=2)
    _fill(limiter, *(0.9 - 0.1 * n for n in range(9)))  # 9 sends in the last 0.9 s
    held = limiter.send_slot("receitaws", batch=True)
    assert not held.taken and held.wait > 0  # the batch's share of this second is used
    assert [limiter.send_slot("receitaws").wait for _ in range(2)] == [0.0, 0.0]  # a person's are not


def test_a_batch_call_never_takes_a_slot_ahead_that_a_persons_call_would_queue_behind(settings, redis_client):
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":ahead", rate=600, reserve=2)
    taken = [limiter.send_slot("receitaws", batch=True) for _ in range(4)]
    # The burst at once, then the next slot a gap ahead: more than half a gap, so not taken.
    assert [slot.taken for slot in taken] == [True, True, False, False]
    person = limiter.send_slot("receitaws")
    assert person.taken and person.wait <= limiter.pacing("receitaws").gap


def test_calls_holding_consecutive_tokens_but_released_late_together_leave_one_by_one(settings, redis_client):
    """Eight calls reserve consecutive tokens (10 a second), turn up together once all their slots
    have passed (a late broker), and each takes a send slot right before sending: none sends
    before its slot, and the slots are a gap apart after the burst, however the calls bunched."""
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":late", rate=600)
    assert [limiter.reserve("receitaws").granted for _ in range(8)] == [True] * 8
    _wait_until(lambda: limiter.tokens("receitaws") >= 0, 5)  # every token's time has passed: all late
    barrier = threading.Barrier(8)
    sent: list[float] = []

    def call() -> None:
        barrier.wait(10)
        wait, permit = limiter.await_send("receitaws")
        assert wait == 0 and permit.confirm() == 0
        sent.append(_redis_now_local(limiter))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    slots = _slots(limiter)
    assert len(sent) == len(slots) == 8
    assert slots[1] - slots[0] < 0.05  # the burst, at once
    # Then one a gap after another from the first (or later: a slot a starved thread missed and gave
    # back leaves a hole, and its call takes the next free one).
    gap = limiter.pacing("receitaws").gap
    for number, slot in enumerate(slots[2:], start=1):
        assert slot - slots[0] >= number * gap - 1e-5
    for earlier, later in zip(slots[2:], slots[3:], strict=False):
        assert later - earlier >= gap - 1e-5
    for slot, moment in zip(slots, sorted(sent), strict=True):
        assert moment >= slot - 0.002  # no send before its slot (the clock's bounds: a round trip)


def test_a_call_whose_thread_wakes_past_its_slot_gives_it_back_and_takes_the_next(settings, redis_client):
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":wakes", rate=600, burst=0)
    first = limiter.send_slot("receitaws")  # someone else's: ours is a gap later
    assert first.taken
    overslept = []

    def starved(seconds: float) -> None:  # the first sleep ends 0.3 s late, as a starved thread's
        extra = 0.3 if not overslept else 0.0
        overslept.append(seconds + extra)
        deadline = time.monotonic() + seconds + extra
        while (left := deadline - time.monotonic()) > 0:
            threading.Event().wait(left)

    limiter.sleep = starved
    wait, permit = limiter.await_send("receitaws")
    missed = permit.slot
    assert wait == 0 and permit.confirm() == 0
    assert permit.missed == 1 and permit.slot.at - missed.at >= 0.3  # the next free one, after the wake
    assert _slots(limiter) == [
        pytest.approx(first.at),
        pytest.approx(permit.slot.at),
    ]  # the missed one given back


def test_the_redis_clock_narrows_to_the_fastest_round_trip_and_starts_over_when_stepped():
    clock = RedisClock()
    clock.observe(1000.0, sent=899.9, received=900.1)  # Redis 100 s ahead, give or take 0.1 s
    clock.observe(1001.0, sent=900.98, received=901.0)
    assert (clock.low, clock.high) == (pytest.approx(100.0), pytest.approx(100.02, abs=1e-3))
    assert clock.local(1002.0) == pytest.approx(902.0)  # no earlier than Redis's 1002.0
    clock.observe(1500.0, sent=902.0, received=902.01)  # a clock was stepped: the old bounds are wrong
    assert (clock.low, clock.high) == (pytest.approx(597.99), pytest.approx(598.0))


def test_with_rate_limiting_off_a_call_sends_at_once_and_takes_no_slot(settings, redis_client):
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":off", rate=1)
    limiter.flags = FeatureFlags(redis_client, limiter.settings)
    limiter.flags.set("rate_limiting", False)
    assert [limiter.await_send("receitaws") for _ in range(5)] == [(0.0, None)] * 5
    assert _slots(limiter) == []


def test_a_source_limited_past_pace_max_rate_sends_at_once_and_takes_no_slot(settings, redis_client):
    """The benchmarks' "unlimited" sources (100,000 a second): the bucket alone limits them."""
    limiter = _limiter(settings.redis_url, settings.key_prefix + ":fast", rate=6_000_000)
    assert not limiter.paces("receitaws") and limiter.send_lead("receitaws") == 0
    assert [limiter.await_send("receitaws") for _ in range(3)] == [(0.0, None)] * 3
    assert _slots(limiter) == []


def _redis_now_local(limiter: RateLimiter) -> float:
    """Now on Redis's clock as this process knows it (its earliest possible reading)."""
    return time.time() + limiter.clock.low


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.02)
