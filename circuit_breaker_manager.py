"""Circuit breakers shared by every process through Redis: one pybreaker breaker per source."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker
import redis

from enrich import metrics, redis_store
from enrich.feature_flags import FeatureFlags
from enrich.settings import Settings, SourceSettings
from enrich.sources import NotFound, SourceError, TransientError, UpstreamRejected

logger = logging.getLogger("breakers")
T = TypeVar("T")

# A probe permit outlives the source timeout by this much, so a prober that crashed mid-call
# frees its permit instead of keeping the breaker half-open (and rejecting) forever.
PERMIT_MARGIN = 2.0
FIELDS = ("state", "failures", "successes", "opened_at")

# Every state change is one Lua script, so it is atomic across processes and machines, and
# "now" is the Redis server's clock (TIME), which every process agrees on.  opened_at is kept
# in milliseconds: pybreaker keeps whole seconds, so a 2 s reset_timeout could end after 1 s.
# KEYS[1] is the hash with FIELDS, KEYS[2] a sorted set of probe permits scored by expiry.
_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', string.format('%.3f', now), 'successes', 0)
  redis.call('DEL', KEYS[2])
end
local function half_open() redis.call('HSET', KEYS[1], 'state', 'half-open', 'successes', 0) end
local function close()
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'successes', 0)
  redis.call('HDEL', KEYS[1], 'opened_at') redis.call('DEL', KEYS[2])
end
"""
_SCRIPTS = {
    # ARGV: reset_timeout, probes, permit_ttl, permit id -> {decision, state before, retry_at}
    # ('run' in the closed state: retry_at is the failure count, so a caller knows when a
    # success would change nothing)
    "admit": """
if state == 'closed' then return {'run', state, redis.call('HGET', KEYS[1], 'failures') or '0'} end
local before = state
if state == 'open' then
  local retry_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0') + tonumber(ARGV[1])
  if now < retry_at then return {'reject', state, string.format('%.3f', retry_at)} end
  half_open()
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[3]) * 1000))
  return {'probe', before, ''}
end
return {'reject', before, redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2]}
""",
    # ARGV: 'success'|'failure', permit id ('' unless a probe), fail_max, success_threshold
    # -> {state after, state before}.  A result that no longer fits the state is ignored (a
    # closed-state call ending after the circuit opened, a probe ending after a reset).
    "record": """
local probe = ARGV[2] ~= ''
if probe then redis.call('ZREM', KEYS[2], ARGV[2]) end
if probe and state == 'half-open' then
  if ARGV[1] == 'failure' then open() return {'open', state} end
  if redis.call('HINCRBY', KEYS[1], 'successes', 1) < tonumber(ARGV[4]) then return {state, state} end
  close() return {'closed', state}
elseif not probe and state == 'closed' then
  if ARGV[1] == 'success' then
    if tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0 then redis.call('HSET', KEYS[1], 'failures', 0) end
  elseif redis.call('HINCRBY', KEYS[1], 'failures', 1) >= tonumber(ARGV[3]) then
    open() return {'open', state}
  end
end
return {state, state}
""",
    # ARGV: target state -> state before
    "force": """
if ARGV[1] == 'open' then open()
elseif ARGV[1] == 'half-open' then half_open() redis.call('DEL', KEYS[2])
else close() end
return state
""",
}


class BreakerOpen(pybreaker.CircuitBreakerError):
    """The source's breaker is open: no call was made. `retry_at` is when a probe may be tried."""

    def __init__(self, source: str, retry_at: float | None) -> None:
        super().__init__(f"circuit breaker for {source} is open")
        self.source = source
        self.retry_at = retry_at


class CallWithdrawn(Exception):
    """Raised by the called function before it reaches the upstream (it must wait after all):
    neither a success nor a failure; a probe permit it held is given back."""


class BreakerUnavailable(Exception):
    """Redis (the breaker state) is unreachable: no call was made; treat as transient."""

    def __init__(self, source: str) -> None:
        super().__init__(f"circuit breaker state for {source} is unreachable")
        self.source = source


@dataclass(frozen=True)
class BreakerStatus:
    """One breaker's shared state, as every process sees it."""

    name: str
    state: str
    failures: int
    successes: int
    opened_at: float | None
    fail_max: int
    reset_timeout: float
    success_threshold: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_final_answer(error: BaseException) -> bool:
    """NotFound, UpstreamRejected or another 4xx-like SourceError: the upstream works."""
    status = getattr(error, "status", None) or 0
    return isinstance(error, NotFound | UpstreamRejected) or (
        isinstance(error, SourceError) and not isinstance(error, TransientError) and 400 <= status < 500
    )


def _text(value: Any) -> Any:
    # Replies are bytes from our clients and str from a decode_responses=True client
    # (pybreaker's storage calls .decode() on them and breaks); accept both.
    return value.decode() if isinstance(value, bytes) else value


class RedisBreakerStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage, kept in one hash per source and changed by atomic scripts.

    Redis errors raise BreakerUnavailable: pybreaker logs them and answers "closed", which let
    every call through while Redis was down.
    """

    def __init__(self, redis_client: redis.Redis, settings: Settings, source_name: str) -> None:
        self.source = source_name
        self._keys = [redis_store.key(settings, "breaker", source_name, part) for part in ("state", "probes")]
        super().__init__(pybreaker.STATE_CLOSED, redis_client)
        self._scripts = {
            name: redis_client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }

    def _initialize_redis_state(self, state: str) -> None:
        """Write nothing: a missing hash reads as closed, and building a breaker must not write."""

    def _guard(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except redis.RedisError as error:
            raise BreakerUnavailable(self.source) from error

    def run(self, script: str, *args: Any) -> Any:
        """Run one of the state scripts; lists come back as lists of str."""
        reply = self._guard(lambda: self._scripts[script](keys=self._keys, args=args))
        return [_text(value) for value in reply] if isinstance(reply, list) else _text(reply)

    def give_back(self, permit: str) -> None:
        """Return a probe permit that was not used (best effort: it expires anyway)."""
        try:
            self._redis.zrem(self._keys[1], permit)
        except redis.RedisError:
            pass

    def snapshot(self) -> dict[str, Any]:
        """The stored state, failures, successes and opened_at (epoch float or None)."""
        state, failures, successes, opened_at = map(
            _text, self._guard(self._redis.hmget, self._keys[0], FIELDS)
        )
        return {
            "state": state or pybreaker.STATE_CLOSED,
            "failures": int(failures or 0),
            "successes": int(successes or 0),
            "opened_at": float(opened_at) if opened_at else None,
        }

    # pybreaker's storage interface.  Its readers work; its writers are pybreaker's separate,
    # racy steps (increment, then read, then open), so every change goes through the scripts.
    @property
    def state(self) -> str:
        return self.snapshot()["state"]

    @property
    def counter(self) -> int:
        return self.snapshot()["failures"]

    @property
    def success_counter(self) -> int:
        return self.snapshot()["successes"]

    @property
    def opened_at(self) -> datetime | None:
        value = self.snapshot()["opened_at"]
        return None if value is None else datetime.fromtimestamp(value, UTC)

    def _use_the_scripts(self, *args: Any) -> None:
        raise NotImplementedError("breaker state changes only through RedisBreakerStorage.run")

    increment_counter = reset_counter = _use_the_scripts
    increment_success_counter = reset_success_counter = _use_the_scripts


class SharedCircuitBreaker(pybreaker.CircuitBreaker):
    """A pybreaker breaker whose state lives in Redis and changes only in atomic steps.

    Closed: calls run. A failure increments the shared counter, and the failure that reaches
    fail_max opens the circuit in the same step; a success resets the counter.
    Open: calls fail at once with BreakerOpen until reset_timeout has passed since opened_at.
    Half-open: a call runs as a probe only if it obtains one of `probes` cluster-wide permits;
    the others fail as open. A failed probe re-opens the circuit (new opened_at), and
    success_threshold successful probes close it. A permit expires after `permit_ttl`.
    Excluded exceptions (final answers such as NotFound) count as successes, as in pybreaker.
    Building one reads the state from Redis (pybreaker's constructor does).
    """

    def __init__(
        self, storage: RedisBreakerStorage, source: SourceSettings, probes: int, listeners: list
    ) -> None:
        self.probes = probes
        self.permit_ttl = source.timeout + PERMIT_MARGIN
        super().__init__(
            fail_max=source.breaker_fail_max,
            reset_timeout=source.breaker_reset_timeout,
            success_threshold=source.breaker_success_threshold,
            exclude=[is_final_answer],
            listeners=listeners,
            state_storage=storage,
            name=source.name,
            throw_new_error_on_trip=False,
        )
        self.storage = storage

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `func` if the breaker allows it; record the outcome; re-raise its exception as-is.

        pybreaker holds self._lock for the whole call, which serializes every call of the
        process (10 threads x 200 ms ran at 5 calls/s); here only the two short Redis steps
        around the call are shared.  If Redis is unreachable, BreakerUnavailable is raised and
        func is not called: without Redis there are no rate-limit tokens either, so no upstream
        call may be made; the caller retries later as for any transient error.
        """
        permit = uuid.uuid4().hex
        admit = ("admit", self.reset_timeout, self.probes, self.permit_ttl, permit)
        decision, before, retry_at = self.storage.run(*admit)
        if decision == "reject":
            self._changed(before, before)
            raise BreakerOpen(self.name, float(retry_at) if retry_at else None)
        self._changed(before, pybreaker.STATE_HALF_OPEN if decision == "probe" else before)
        # Closed with no failures counted: a success would change nothing, so it skips its round
        # trip (a failure another process counts meanwhile is then not reset by this success).
        clean = decision == "run" and retry_at in ("0", "")
        permit = permit if decision == "probe" else ""
        for listener in self.listeners:
            listener.before_call(self, func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except CallWithdrawn:
            if permit:
                self.storage.give_back(permit)
            raise
        except Exception as error:
            if not self.is_system_error(error):  # a final answer: the upstream works
                self._succeeded(permit, clean)
                raise
            self._record("failure", permit)
            for listener in self.listeners:
                listener.failure(self, error)
            raise
        self._succeeded(permit, clean)
        return result

    def _succeeded(self, permit: str, clean: bool = False) -> None:
        if not clean:
            self._record("success", permit)
        for listener in self.listeners:
            listener.success(self)

    def _record(self, outcome: str, permit: str) -> None:
        # The upstream has answered by now, so its answer stands even if Redis just went away.
        try:
            after, before = self.storage.run("record", outcome, permit, self.fail_max, self.success_threshold)
        except BreakerUnavailable:
            logger.warning("breaker %s: could not record a %s, Redis is unreachable", self.name, outcome)
            return
        self._changed(before, after)

    def _changed(self, before: str, after: str) -> None:
        """Track the shared state; announce only the transitions this process made.

        pybreaker announces a change in every process that notices it; here each transition is
        announced (and logged) once in the cluster, by the process whose script made it.
        """
        new = self._create_new_state(after)
        with self._lock:
            previous, self._state = self._state, new
        if before != after:
            old = previous if previous.name == before else self._create_new_state(before)
            for listener in self.listeners:
                listener.state_change(self, old, new)

    def _create_new_state(self, new_state: str, prev_state: Any = None, notify: bool = False) -> Any:
        # pybreaker's state constructors with notify=True reset the shared counters, and its
        # `state` getter uses them whenever another process changed the state: one process
        # noticing another's change wiped the failures (5 to 7 failures to open).
        return super()._create_new_state(new_state, prev_state)

    # pybreaker's open/half_open/close write state and opened_at in separate, racy steps.
    def _force(self, state: str) -> None:
        self._changed(self.storage.run("force", state), state)

    def open(self) -> bool:
        self._force(pybreaker.STATE_OPEN)
        return self._throw_new_error_on_trip

    def half_open(self) -> None:
        self._force(pybreaker.STATE_HALF_OPEN)

    def close(self) -> None:
        self._force(pybreaker.STATE_CLOSED)

    def status(self) -> BreakerStatus:
        """The shared state as stored, with this breaker's thresholds."""
        return BreakerStatus(
            name=self.name or "",
            **self.storage.snapshot(),
            fail_max=self.fail_max,
            reset_timeout=self.reset_timeout,
            success_threshold=self.success_threshold,
        )


class LoggingListener(pybreaker.CircuitBreakerListener):
    """Logs every state change (logger "breakers")."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        level = logging.WARNING if new_state.name == pybreaker.STATE_OPEN else logging.INFO
        logger.log(level, "breaker %s: %s -> %s", cb.name, getattr(old_state, "name", None), new_state.name)


class MetricsListener(pybreaker.CircuitBreakerListener):
    """Counts every state change (enrich_breaker_transitions_total), once in the cluster like the log."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        metrics.breaker_transition(cb.name or "", getattr(old_state, "name", "") or "", new_state.name)


class BreakerManager:
    """The named breakers of every source in settings.sources, built on first use."""

    def __init__(
        self, redis_client: redis.Redis, settings: Settings, flags: FeatureFlags | None = None
    ) -> None:
        self._redis = redis_client
        self._settings = settings
        self._flags = flags
        self._breakers: dict[str, SharedCircuitBreaker] = {}
        self._listeners = [LoggingListener(), MetricsListener()]

    def breaker(self, source_name: str) -> SharedCircuitBreaker:
        """The source's breaker (raises KeyError for an unknown source)."""
        breaker = self._breakers.get(source_name)
        if breaker is None:
            source = self._settings.sources.get(source_name)
            if source is None:
                known = ", ".join(sorted(self._settings.sources))
                raise KeyError(f"unknown source {source_name!r} (known sources: {known})")
            storage = RedisBreakerStorage(self._redis, self._settings, source_name)
            probes = self._settings.breaker_half_open_probes
            breaker = SharedCircuitBreaker(storage, source, probes, list(self._listeners))
            breaker = self._breakers.setdefault(source_name, breaker)
        return breaker

    def call(self, source_name: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call func through the source's breaker (BreakerOpen, BreakerUnavailable, or func's error).

        While the `circuit_breaker` feature flag is off, func is called directly: no state is read
        or recorded, so an open breaker stays open (and counts nothing) until the flag is back on.
        """
        if self._flags is not None and not self._flags.enabled("circuit_breaker"):
            self.breaker(source_name)  # still a KeyError for an unknown source
            return func(*args, **kwargs)
        return self.breaker(source_name).call(func, *args, **kwargs)

    def status(self, source_name: str) -> BreakerStatus:
        """The source's breaker state as stored in Redis."""
        return self.breaker(source_name).status()

    def status_all(self) -> dict[str, BreakerStatus]:
        """Status of every configured source's breaker."""
        return {name: self.status(name) for name in self._settings.sources}

    def reset(self, source_name: str) -> None:
        """Admin: close the breaker and zero its counters."""
        self.breaker(source_name).close()

    def force_open(self, source_name: str) -> None:
        """Admin: open the breaker now (it half-opens after reset_timeout as usual)."""
        self.breaker(source_name).open()
