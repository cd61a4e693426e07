"""Circuit breakers shared by every process through Redis: one pybreaker breaker per source.

pybreaker is used through its public seams, and tests/test_pybreaker_contract.py pins each
behaviour of it relied on here:

- `RedisBreakerStorage` is a `pybreaker.CircuitBreakerStorage`; `SharedCircuitBreaker` is a
  `pybreaker.CircuitBreaker` built with its public constructor. pybreaker keeps the thresholds,
  the name, the listeners (`add_listener`) and the exclusions (`is_system_error`), and its readers
  (`current_state`, `fail_counter`, `success_counter`) read the shared state through the storage
  on every access. Building a breaker reads the state once and writes nothing.
- Listeners are `pybreaker.CircuitBreakerListener`s, called as pybreaker calls them and in its
  order: `before_call`, then `success` or `failure`, then (a call that changed the state)
  `state_change(cb, old, new)` with pybreaker's public state
  objects (`CircuitClosedState`, `CircuitOpenState`, `CircuitHalfOpenState`, built with
  `notify=False`, which only names a state). `BreakerOpen` is a `pybreaker.CircuitBreakerError`.

The state machine itself is owned here, because pybreaker's public API cannot express it:

- Cluster-wide half-open permits. pybreaker's half-open state lets through every call that
  reaches it. Nothing in its API limits trial calls across processes, lets a crashed prober's
  permit expire, or takes a permit back from a call that withdrew (`CallWithdrawn`).
- Atomic changes. pybreaker's states change the storage in separate steps (add a failure, read
  the count, set opened_at, set the state), and the storage interface has no "record this
  outcome" step, so two processes could both count the failure that opens. Every change here is
  one Lua script (`admit`, `record`, `force`) on the Redis clock, with opened_at in milliseconds.
- Concurrency. pybreaker's `call` holds a process lock for the whole call, which serializes every
  call of the process (10 threads x 200 ms ran at 5 calls/s). Here only the two short Redis steps
  around the call are shared.
- Announcements. pybreaker's `state` getter, noticing a change made elsewhere, builds the new
  state with `notify=True`, which resets the shared counters and announces the change again in
  every process. Here each transition is announced once in the cluster, by the process whose
  script made it, and reading `state` has no side effects.

So `SharedCircuitBreaker` overrides pybreaker's public `call`, `calling`, `open`, `half_open`,
`close` and `state`, and refuses `call_async`; the storage refuses pybreaker's writers. No
pybreaker name with a leading underscore is called, overridden or read.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
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
    # Replies are bytes from our clients and str from a decode_responses=True client; accept both.
    return value.decode() if isinstance(value, bytes) else value


class RedisBreakerStorage(pybreaker.CircuitBreakerStorage):
    """A pybreaker storage kept in one hash per source (and a sorted set of probe permits),
    changed only by the atomic scripts.

    pybreaker's own CircuitRedisStorage does not fit: its constructor writes (building a breaker
    to read its status would create keys), its writers are separate steps, it keeps opened_at in
    whole seconds, and it answers "closed" when Redis is down, which let every call through.
    Redis errors here raise BreakerUnavailable.
    """

    def __init__(self, redis_client: redis.Redis, settings: Settings, source_name: str) -> None:
        super().__init__("redis")
        self.source = source_name
        self._client = redis_client
        self._keys = [redis_store.key(settings, "breaker", source_name, part) for part in ("state", "probes")]
        self._scripts = {
            name: redis_client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }

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
            self._client.zrem(self._keys[1], permit)
        except redis.RedisError:
            pass

    def snapshot(self) -> dict[str, Any]:
        """The stored state, failures, successes and opened_at (epoch float or None)."""
        state, failures, successes, opened_at = map(
            _text, self._guard(self._client.hmget, self._keys[0], FIELDS)
        )
        return {
            "state": state or pybreaker.STATE_CLOSED,
            "failures": int(failures or 0),
            "successes": int(successes or 0),
            "opened_at": float(opened_at) if opened_at else None,
        }

    # pybreaker's storage interface.  Its readers are answered from the hash; its writers are
    # pybreaker's separate, racy steps, so they refuse: every change goes through the scripts.
    @property
    def state(self) -> str:
        return self.snapshot()["state"]

    @state.setter
    def state(self, state: str) -> None:
        self._use_the_scripts(state)

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

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._use_the_scripts(value)

    def _use_the_scripts(self, *args: Any) -> None:
        raise NotImplementedError("breaker state changes only through RedisBreakerStorage.run")

    increment_counter = reset_counter = _use_the_scripts
    increment_success_counter = reset_success_counter = _use_the_scripts


# pybreaker's public state classes, by the names the scripts store.
STATE_CLASSES: dict[str, type[pybreaker.CircuitBreakerState]] = {
    pybreaker.STATE_CLOSED: pybreaker.CircuitClosedState,
    pybreaker.STATE_OPEN: pybreaker.CircuitOpenState,
    pybreaker.STATE_HALF_OPEN: pybreaker.CircuitHalfOpenState,
}


@dataclass(frozen=True)
class _Admission:
    """What `admit` granted one call: its probe permit ('' unless a probe), and whether a success
    would change nothing (closed, no failures counted), so it may skip its round trip."""

    permit: str
    clean: bool


def _with_block() -> None:
    """What listeners' before_call is given for the body of a `with breaker.calling():` block."""


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

    @property
    def state(self) -> pybreaker.CircuitBreakerState:
        """The shared state as a pybreaker state object: read from Redis, announcing nothing."""
        return self._state_object(self.current_state)

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `func` if the breaker allows it; record the outcome; re-raise its exception as-is.

        If Redis is unreachable, BreakerUnavailable is raised and func is not called: without
        Redis there are no rate-limit tokens either, so no upstream call may be made; the caller
        retries later as for any transient error.
        """
        admission = self._admit()
        for listener in self.listeners:
            listener.before_call(self, func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except Exception as error:
            self._settle(admission, error)
            raise
        self._settle(admission, None)
        return result

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """The body of a `with breaker.calling():` block is guarded as `call` guards a function."""
        admission = self._admit()
        for listener in self.listeners:
            listener.before_call(self, _with_block)
        try:
            yield
        except Exception as error:
            self._settle(admission, error)
            raise
        self._settle(admission, None)

    def call_async(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Not supported: pybreaker's Tornado path would bypass the shared state."""
        raise NotImplementedError("SharedCircuitBreaker has no Tornado calls; use call()")

    def _admit(self) -> _Admission:
        permit = uuid.uuid4().hex
        admit = ("admit", self.reset_timeout, self.probes, self.permit_ttl, permit)
        decision, before, retry_at = self.storage.run(*admit)
        if decision == "reject":
            raise BreakerOpen(self.name, float(retry_at) if retry_at else None)
        if decision == "probe":
            self._announce(before, pybreaker.STATE_HALF_OPEN)
            return _Admission(permit, clean=False)
        # Closed with no failures counted: a success would change nothing, so it skips its round
        # trip (a failure another process counts meanwhile is then not reset by this success).
        return _Admission("", clean=retry_at in ("0", ""))

    def _settle(self, admission: _Admission, error: Exception | None) -> None:
        """Record the outcome and tell the listeners, in pybreaker's order."""
        if isinstance(error, CallWithdrawn):  # neither a success nor a failure
            if admission.permit:
                self.storage.give_back(admission.permit)
            return
        if error is not None and self.is_system_error(error):
            change = self._record("failure", admission.permit)
            for listener in self.listeners:
                listener.failure(self, error)
            self._announce(*change)
            return
        # A success, or a final answer (the upstream works).
        if not admission.clean:
            self._announce(*self._record("success", admission.permit))
        for listener in self.listeners:
            listener.success(self)

    def _record(self, outcome: str, permit: str) -> tuple[str, str]:
        """Record an outcome; (state before, state after)."""
        # The upstream has answered by now, so its answer stands even if Redis just went away.
        try:
            after, before = self.storage.run("record", outcome, permit, self.fail_max, self.success_threshold)
        except BreakerUnavailable:
            logger.warning("breaker %s: could not record a %s, Redis is unreachable", self.name, outcome)
            return "", ""
        return before, after

    def _state_object(
        self, state: str, previous: pybreaker.CircuitBreakerState | None = None
    ) -> pybreaker.CircuitBreakerState:
        # notify=False only names the state: with notify=True pybreaker's constructors reset the
        # shared counters and call the listeners.
        return STATE_CLASSES[state](self, prev_state=previous, notify=False)

    def _announce(self, before: str, after: str) -> None:
        """Tell the listeners of a transition this process's script made (once in the cluster).

        pybreaker announces a change in every process that notices it.
        """
        if before != after:
            old = self._state_object(before)
            new = self._state_object(after, old)
            for listener in self.listeners:
                listener.state_change(self, old, new)

    # pybreaker's open/half_open/close write state and opened_at in separate, racy steps.
    def _force(self, state: str) -> None:
        self._announce(self.storage.run("force", state), state)

    def open(self) -> bool:
        """Open the circuit now (one script); False: a trip never replaces the caller's error."""
        self._force(pybreaker.STATE_OPEN)
        return False

    def half_open(self) -> None:
        """Half-open the circuit now: the next calls compete for the probe permits."""
        self._force(pybreaker.STATE_HALF_OPEN)

    def close(self) -> None:
        """Close the circuit now and zero its counters."""
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
        self._client = redis_client
        self._settings = settings
        self._flags = flags
        self._breakers: dict[str, SharedCircuitBreaker] = {}
        self._shared_listeners = [LoggingListener(), MetricsListener()]

    def breaker(self, source_name: str) -> SharedCircuitBreaker:
        """The source's breaker (raises KeyError for an unknown source)."""
        breaker = self._breakers.get(source_name)
        if breaker is None:
            source = self._settings.sources.get(source_name)
            if source is None:
                known = ", ".join(sorted(self._settings.sources))
                raise KeyError(f"unknown source {source_name!r} (known sources: {known})")
            storage = RedisBreakerStorage(self._client, self._settings, source_name)
            probes = self._settings.breaker_half_open_probes
            breaker = SharedCircuitBreaker(storage, source, probes, list(self._shared_listeners))
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
