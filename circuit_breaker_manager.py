"""Circuit breakers shared by every process through Redis: one pybreaker breaker per source."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker
import redis
from flask import current_app

import redis_store
from settings import Settings, SourceSettings
from sources import NotFound, SourceError, TransientError, UpstreamRejected

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
local function close()
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'successes', 0)
  redis.call('HDEL', KEYS[1], 'opened_at')
  redis.call('DEL', KEYS[2])
end
"""
_SCRIPTS = {
    # ARGV: reset_timeout, probes, permit_ttl, permit id -> {decision, state before, retry_at}
    "admit": """
if state == 'closed' then return {'run', state, ''} end
local before = state
if state == 'open' then
  local retry_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0') + tonumber(ARGV[1])
  if now < retry_at then return {'reject', state, string.format('%.3f', retry_at)} end
  redis.call('HSET', KEYS[1], 'state', 'half-open', 'successes', 0)
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
elseif ARGV[1] == 'half-open' then
  redis.call('HSET', KEYS[1], 'state', 'half-open', 'successes', 0)
  redis.call('DEL', KEYS[2])
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
    """A 4xx-like answer (not 408/429): the upstream works, so it is no breaker failure."""
    if isinstance(error, NotFound | UpstreamRejected):
        return True
    status = getattr(error, "status", None)
    return (
        isinstance(error, SourceError)
        and not isinstance(error, TransientError)
        and status is not None
        and 400 <= status < 500
        and status not in (408, 429)
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

    def snapshot(self) -> dict[str, str]:
        values = self._guard(self._redis.hmget, self._keys[0], FIELDS)
        return {field: _text(value) for field, value in zip(FIELDS, values, strict=True) if value is not None}

    # pybreaker's storage interface, for code that drives the breaker the library's way.
    @property
    def state(self) -> str:
        return self.snapshot().get("state", pybreaker.STATE_CLOSED)

    @state.setter
    def state(self, state: str) -> None:
        self.run("force", state)

    @property
    def counter(self) -> int:
        return int(self.snapshot().get("failures", 0))

    @property
    def success_counter(self) -> int:
        return int(self.snapshot().get("successes", 0))

    @property
    def opened_at(self) -> datetime | None:
        value = self.snapshot().get("opened_at")
        return datetime.fromtimestamp(float(value), UTC) if value else None

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        self._guard(self._redis.hset, self._keys[0], "opened_at", f"{now.timestamp():.3f}")

    def increment_counter(self) -> None:
        self._guard(self._redis.hincrby, self._keys[0], "failures", 1)

    def reset_counter(self) -> None:
        self._guard(self._redis.hset, self._keys[0], "failures", 0)

    def increment_success_counter(self) -> None:
        self._guard(self._redis.hincrby, self._keys[0], "successes", 1)

    def reset_success_counter(self) -> None:
        self._guard(self._redis.hset, self._keys[0], "successes", 0)


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
        self,
        storage: RedisBreakerStorage,
        source: SourceSettings,
        probes: int,
        listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
    ) -> None:
        self.probes = probes
        self.permit_ttl = source.timeout + PERMIT_MARGIN
        super().__init__(
            fail_max=source.breaker_fail_max,
            reset_timeout=source.breaker_reset_timeout,
            success_threshold=source.breaker_success_threshold,
            exclude=[NotFound, UpstreamRejected, is_final_answer],
            listeners=list(listeners),
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
        decision, before, retry_at = self.storage.run(
            "admit", self.reset_timeout, self.probes, self.permit_ttl, permit
        )
        if decision == "reject":
            self._changed(before, before)
            raise BreakerOpen(self.name, float(retry_at) if retry_at else None)
        self._changed(before, pybreaker.STATE_HALF_OPEN if decision == "probe" else before)
        permit = permit if decision == "probe" else ""
        for listener in self.listeners:
            listener.before_call(self, func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except Exception as error:
            failed = self.is_system_error(error)
            self._record("failure" if failed else "success", permit)
            for listener in self.listeners:
                if failed:
                    listener.failure(self, error)
                else:
                    listener.success(self)
            raise
        self._record("success", permit)
        for listener in self.listeners:
            listener.success(self)
        return result

    def _record(self, outcome: str, permit: str) -> None:
        # The upstream has answered by now, so its answer stands even if Redis just went away.
        try:
            after, before = self.storage.run("record", outcome, permit, self.fail_max, self.success_threshold)
        except BreakerUnavailable:
            logger.warning("breaker %s: could not record a %s, Redis is unreachable", self.name, outcome)
            return
        self._changed(before, after)

    def _changed(self, before: str, after: str) -> None:
        """Track the shared state; announce only transitions this process made.

        pybreaker announces a change in every process that notices it, and its state
        constructors (notify=True) then reset the shared counters: one process noticing
        another's change wiped the failures (5 to 7 failures to open).  Here each transition
        is announced once in the cluster and state objects are built without side effects.
        """
        with self._lock:
            previous, self._state = self._state, self._create_new_state(after)
        if before != after:
            old = previous if previous.name == before else self._create_new_state(before)
            for listener in self.listeners:
                listener.state_change(self, old, self._state)

    @property
    def state(self) -> Any:
        """The shared state as a pybreaker state object, refreshed without side effects."""
        current = self.current_state
        self._changed(current, current)
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._changed(self.storage.run("force", state), state)

    # pybreaker's open/half_open/close write state and opened_at in separate, racy steps.
    def open(self) -> bool:
        self.state = pybreaker.STATE_OPEN
        return self._throw_new_error_on_trip

    def half_open(self) -> None:
        self.state = pybreaker.STATE_HALF_OPEN

    def close(self) -> None:
        self.state = pybreaker.STATE_CLOSED

    def status(self) -> BreakerStatus:
        values = self.storage.snapshot()
        return BreakerStatus(
            name=self.name or "",
            state=values.get("state", pybreaker.STATE_CLOSED),
            failures=int(values.get("failures", 0)),
            successes=int(values.get("successes", 0)),
            opened_at=float(values["opened_at"]) if "opened_at" in values else None,
            fail_max=self.fail_max,
            reset_timeout=self.reset_timeout,
            success_threshold=self.success_threshold,
        )


class LoggingListener(pybreaker.CircuitBreakerListener):
    """Logs every state change (logger "breakers")."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        level = logging.WARNING if new_state.name == pybreaker.STATE_OPEN else logging.INFO
        logger.log(
            level, "breaker %s: %s -> %s", cb.name, old_state.name if old_state else None, new_state.name
        )


class BreakerManager:
    """The named breakers of every source in settings.sources, built on first use."""

    def __init__(self, redis_client: redis.Redis, settings: Settings) -> None:
        self._redis = redis_client
        self._settings = settings
        self._breakers: dict[str, SharedCircuitBreaker] = {}
        self._listener = LoggingListener()

    def breaker(self, source_name: str) -> SharedCircuitBreaker:
        """The source's breaker (raises KeyError for an unknown source)."""
        breaker = self._breakers.get(source_name)
        if breaker is None:
            source = self._settings.sources.get(source_name)
            if source is None:
                known = ", ".join(sorted(self._settings.sources))
                raise KeyError(f"unknown source {source_name!r} (known sources: {known})")
            storage = RedisBreakerStorage(self._redis, self._settings, source_name)
            built = SharedCircuitBreaker(
                storage, source, self._settings.breaker_half_open_probes, [self._listener]
            )
            breaker = self._breakers.setdefault(source_name, built)
        return breaker

    def call(self, source_name: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call func through the source's breaker (BreakerOpen, BreakerUnavailable, or func's error)."""
        return self.breaker(source_name).call(func, *args, **kwargs)

    def call_with_fallback(
        self,
        source_name: str,
        func: Callable[..., T],
        fallback: Callable[[BreakerOpen], T],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        """Like call, but returns fallback(error) while the breaker is open."""
        try:
            return self.call(source_name, func, *args, **kwargs)
        except BreakerOpen as error:
            return fallback(error)

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


def init_app(app: Any) -> None:
    """Keep the app's BreakerManager in app.extensions["breakers"]."""
    app.extensions["breakers"] = BreakerManager(app.extensions["redis"], app.extensions["settings"])


def get_breakers() -> BreakerManager:
    """The current app's BreakerManager."""
    return current_app.extensions["breakers"]
