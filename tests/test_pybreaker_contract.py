"""What circuit_breaker_manager relies on in pybreaker's public API, pinned so an upgrade that
changes it fails here (the module's docstring lists the same points)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pybreaker
import pytest

import circuit_breaker_manager
from circuit_breaker_manager import (
    STATE_CLASSES,
    BreakerManager,
    BreakerOpen,
    RedisBreakerStorage,
    SharedCircuitBreaker,
)
from enrich.settings import Settings
from enrich.sources import TransientError

SOURCE = "brasilapi"

# Every public member of pybreaker.CircuitBreaker, and what SharedCircuitBreaker does with it.
# A member pybreaker adds is a new way in that may bypass the scripts: decide, then list it here.
OVERRIDDEN = {"call", "calling", "call_async", "open", "half_open", "close", "state"}
INHERITED = {
    # configuration, listeners and exclusions, kept by pybreaker
    "fail_max",
    "reset_timeout",
    "success_threshold",
    "name",
    "listeners",
    "add_listener",
    "add_listeners",
    "remove_listener",
    "excluded_exceptions",
    "add_excluded_exception",
    "add_excluded_exceptions",
    "remove_excluded_exception",
    "is_system_error",
    # readers of the storage
    "current_state",
    "fail_counter",
    "success_counter",
}
STORAGE_READERS = {"state", "counter", "success_counter", "opened_at"}
STORAGE_WRITERS = {"increment_counter", "reset_counter", "increment_success_counter", "reset_success_counter"}


class RecordingStorage(pybreaker.CircuitBreakerStorage):
    """A storage whose values the test sets; it records every read and fails every write."""

    def __init__(self, state: str = pybreaker.STATE_CLOSED) -> None:
        super().__init__("recording")
        self.values = {"state": state, "counter": 0, "success_counter": 0, "opened_at": None}
        self.reads: list[str] = []

    def read(self, name: str):
        self.reads.append(name)
        return self.values[name]

    def refuse(self, *args) -> None:
        raise AssertionError(f"pybreaker wrote to the storage {args}")

    state = property(lambda self: self.read("state"), refuse)
    counter = property(lambda self: self.read("counter"))
    success_counter = property(lambda self: self.read("success_counter"))
    opened_at = property(lambda self: self.read("opened_at"), refuse)
    increment_counter = reset_counter = increment_success_counter = reset_success_counter = refuse


class Recorder(pybreaker.CircuitBreakerListener):
    """Every listener callback, in order, with the breaker it came from."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.breakers: set[int] = set()

    def before_call(self, cb, func, *args, **kwargs) -> None:
        self.breakers.add(id(cb))
        self.events.append(("before_call", func.__name__, args))

    def failure(self, cb, exc) -> None:
        self.breakers.add(id(cb))
        self.events.append(("failure", type(exc).__name__))

    def success(self, cb) -> None:
        self.breakers.add(id(cb))
        self.events.append(("success",))

    def state_change(self, cb, old_state, new_state) -> None:
        self.breakers.add(id(cb))
        self.events.append(("state_change", type(old_state).__name__, type(new_state).__name__))


def fail() -> None:
    raise TransientError("upstream is down")


def succeed() -> str:
    return "ok"


def test_the_state_names_are_the_ones_the_scripts_store():
    assert (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN) == (
        "closed",
        "open",
        "half-open",
    )
    assert set(STATE_CLASSES) == {"closed", "open", "half-open"}


def test_the_storage_interface_is_the_one_redis_breaker_storage_implements():
    public = {name for name in vars(pybreaker.CircuitBreakerStorage) if not name.startswith("_")}
    assert public == STORAGE_READERS | STORAGE_WRITERS | {"name"}
    assert public - {"name"} <= set(vars(RedisBreakerStorage))  # nothing falls through to the base
    assert RecordingStorage().name == "recording"


def test_building_a_breaker_reads_only_the_state_and_writes_nothing():
    storage = RecordingStorage(pybreaker.STATE_OPEN)
    pybreaker.CircuitBreaker(state_storage=storage, throw_new_error_on_trip=False)
    assert set(storage.reads) <= {"state"}  # RecordingStorage fails any write


def test_its_readers_read_the_storage_on_every_access():
    storage = RecordingStorage()
    breaker = pybreaker.CircuitBreaker(state_storage=storage)
    for state, failures, successes in [("open", 3, 0), ("half-open", 3, 1), ("closed", 0, 0)]:
        storage.values.update(state=state, counter=failures, success_counter=successes)
        assert (breaker.current_state, breaker.fail_counter, breaker.success_counter) == (
            state,
            failures,
            successes,
        )


def test_the_constructor_keeps_what_the_shared_breaker_reads():
    listener, added = Recorder(), Recorder()
    breaker = pybreaker.CircuitBreaker(
        fail_max=3,
        reset_timeout=1.5,
        success_threshold=2,
        exclude=[lambda error: isinstance(error, KeyError), LookupError],
        listeners=[listener],
        state_storage=RecordingStorage(),
        name="source",
        throw_new_error_on_trip=False,
    )
    assert (breaker.fail_max, breaker.reset_timeout, breaker.success_threshold) == (3, 1.5, 2)
    assert breaker.name == "source"
    breaker.add_listener(added)
    assert breaker.listeners == (listener, added)
    assert not breaker.is_system_error(KeyError("a predicate excludes it"))
    assert not breaker.is_system_error(IndexError("a LookupError: its type is excluded"))
    assert breaker.is_system_error(TransientError("down"))


def test_listener_callbacks_take_what_the_shared_breaker_passes():
    def parameters(name: str) -> list[tuple[str, object]]:
        signature = inspect.signature(getattr(pybreaker.CircuitBreakerListener, name))
        return [(parameter.name, parameter.kind) for parameter in signature.parameters.values()]

    positional, variadic, keywords = (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    )
    assert parameters("before_call") == [
        ("self", positional),
        ("cb", positional),
        ("func", positional),
        ("args", variadic),
        ("kwargs", keywords),
    ]
    assert parameters("failure") == [("self", positional), ("cb", positional), ("exc", positional)]
    assert parameters("success") == [("self", positional), ("cb", positional)]
    assert parameters("state_change") == [
        ("self", positional),
        ("cb", positional),
        ("old_state", positional),
        ("new_state", positional),
    ]


@pytest.mark.parametrize("name", sorted(STATE_CLASSES))
def test_a_state_object_built_without_notify_only_names_the_state(name):
    storage, listener = RecordingStorage(), Recorder()
    breaker = pybreaker.CircuitBreaker(state_storage=storage, listeners=[listener])
    storage.reads.clear()
    previous = pybreaker.CircuitClosedState(breaker, prev_state=None, notify=False)
    state = STATE_CLASSES[name](breaker, prev_state=previous, notify=False)
    assert isinstance(state, pybreaker.CircuitBreakerState)
    assert state.name == name
    assert (storage.reads, listener.events) == ([], [])  # and RecordingStorage fails any write


def run_the_scenario(breaker_call) -> list[tuple]:
    """A failure that trips a breaker with fail_max 1 and reset_timeout 0, then a probe."""
    with pytest.raises(TransientError):  # the caller's error, not a new one on the trip
        breaker_call(fail)
    assert breaker_call(succeed) == "ok"
    return [
        ("before_call", "fail", ()),
        ("failure", "TransientError"),
        ("state_change", "CircuitClosedState", "CircuitOpenState"),
        ("state_change", "CircuitOpenState", "CircuitHalfOpenState"),
        ("before_call", "succeed", ()),
        ("state_change", "CircuitHalfOpenState", "CircuitClosedState"),
        ("success",),
    ]


def test_pybreaker_and_the_shared_breaker_call_listeners_alike(settings, redis_client):
    listener = Recorder()
    plain = pybreaker.CircuitBreaker(
        fail_max=1, reset_timeout=0, listeners=[listener], throw_new_error_on_trip=False
    )
    expected = run_the_scenario(plain.call)
    assert listener.events == expected
    assert listener.breakers == {id(plain)}

    shared_settings = Settings.from_env(
        {},
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
        breaker_fail_max=1,
        breaker_reset_timeout=0.0,
        breaker_success_threshold=1,
    )
    shared = BreakerManager(redis_client, shared_settings).breaker(SOURCE)
    listener = Recorder()
    shared.add_listener(listener)
    expected = run_the_scenario(shared.call)
    assert listener.events == expected
    assert listener.breakers == {id(shared)}


def test_an_open_breaker_raises_circuit_breaker_error_and_breaker_open_is_one(settings, redis_client):
    listener = Recorder()
    plain = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60, listeners=[listener])
    plain.open()
    listener.events.clear()
    with pytest.raises(pybreaker.CircuitBreakerError):
        plain.call(succeed)
    assert listener.events == []  # a refused call reaches no listener

    shared = BreakerManager(redis_client, settings).breaker(SOURCE)
    shared.open()
    shared.add_listener(listener)
    with pytest.raises(pybreaker.CircuitBreakerError) as refused:
        shared.call(succeed)
    assert isinstance(refused.value, BreakerOpen)
    assert listener.events == []


def test_every_public_member_of_circuit_breaker_is_overridden_or_only_reads():
    public = {name for name in dir(pybreaker.CircuitBreaker) if not name.startswith("_")}
    assert public == OVERRIDDEN | INHERITED
    assert set(vars(SharedCircuitBreaker)) & public == OVERRIDDEN
    # The decorator form is pybreaker's __call__, which goes through call (tested in
    # test_circuit_breaker_manager).
    assert "__call__" in vars(pybreaker.CircuitBreaker)
    assert "__call__" not in vars(SharedCircuitBreaker)


def test_the_module_uses_no_private_pybreaker_name():
    """No attribute read, method defined or name assigned in circuit_breaker_manager.py shares a
    name with one of pybreaker's underscore names (a private name is not an extension point)."""
    private = set(re.findall(r"\b(_[A-Za-z]\w*)", inspect.getsource(pybreaker))) - {"__future__"}
    assert {"_initialize_redis_state", "_create_new_state", "_state", "_lock"} <= private
    used = set()
    for node in ast.walk(ast.parse(Path(circuit_breaker_manager.__file__).read_text())):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            used.add(node.name)
        elif isinstance(node, ast.Name):
            used.add(node.id)
    assert used & private == set()
