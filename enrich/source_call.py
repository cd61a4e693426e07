"""The guarded upstream call and the source-call task's payload, each in one place.

Every call to an upstream takes the same guarded path, `guarded_call`: through the source's
circuit breaker, admitted by the rate limiter's log of starts right before it goes out, the fetch,
and the cache write of what it found.  A lookup's sources (pipeline._SourceCall, batch items'
included) and the cross-check's CEP (pipeline._company_cep) call it; the exceptions that can end a
call become outcomes in one table, `OUTCOMES`.  Taking the call's token comes before and is the
caller's, since its policy differs: a lookup's source may wait for one, the cross-check's CEP takes
one only if there is one now.

`SourceCallTask` is the `job_queue.fetch_source` task's payload: its fields, in order, are the
task's positional arguments, so every send of a call (the first, a wait, a retry, a dead letter's
requeue) is built from it.
"""

from __future__ import annotations

import dataclasses
import enum

from circuit_breaker_manager import BreakerOpen, BreakerUnavailable, CallWithdrawn
from enrich import metrics
from enrich.extensions import Services
from enrich.identifiers import Identifier
from enrich.sources import NotFound, SourceError, TransientError, UpstreamRejected

FETCH_TASK = "job_queue.fetch_source"
LOOKUP_TASK = "job_queue.fetch_lookup"
FINALIZE_TASK = "job_queue.finalize_lookup"


def celery_priority(priority: int) -> int:
    """API priority 1..10 (10 most urgent) onto the Redis transport's 0..9 (0 served first).

    A batch item (pipeline.BATCH_PRIORITY, 0) shares the lowest level with priority 1.
    """
    return 10 - max(1, min(10, priority))


@dataclasses.dataclass(frozen=True)
class SourceCallTask:
    """One call of one source for one lookup, as the fetch_source task carries it.

    `attempt`: failed attempts so far; `reserved`: its token is taken (it waited for its slot);
    `requeue`: a dead letter sent again, whose answer replaces the settled one; `held_since`: when
    a batch item's call was first held back for its source's rate limit (0: never).
    """

    lookup_id: str
    source: str
    kind: str
    value: str
    priority: int
    attempt: int = 0
    reserved: bool = False
    requeue: bool = False
    held_since: float = 0.0

    def args(self) -> list:
        """The task's positional arguments."""
        return [getattr(self, field.name) for field in dataclasses.fields(self)]

    def options(self, task_id: str | None = None, priority: int | None = None) -> dict:
        """apply_async options: its Celery priority (or `priority`, already on Celery's scale) and id."""
        options: dict = {"priority": celery_priority(self.priority) if priority is None else priority}
        if task_id:
            options["task_id"] = task_id
        return options


@dataclasses.dataclass(frozen=True)
class LookupTask:
    """A lookup's first task (fetch_lookup): every source named in `call_ids` called at once, each
    under its own call id (the Celery task id of that source's later sends)."""

    lookup_id: str
    kind: str
    value: str
    priority: int
    call_ids: dict[str, str]

    def args(self) -> list:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


def send_task(parts: Services, name: str, args: list, options: dict) -> None:
    """Put a task on the broker (`options` as for apply_async: task_id, priority)."""
    parts.celery.send_task(name, args=args, **options)


class Paced(CallWithdrawn):
    """A call that found the source's log of starts full right before going out."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"wait {wait:.3f}s for the rate limit")
        self.wait = wait


class Outcome(enum.StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"  # cached as such
    REJECTED = "rejected"  # the upstream refused the request itself: not retried
    PACED = "paced"  # no request went out: the log of starts was full
    CIRCUIT_OPEN = "circuit_open"  # no request went out: the breaker refused it
    FAILED = "failed"  # transient (a timeout, a 5xx, a 429, garbage) or the breaker's state unreadable


# The exceptions that end a guarded call, as outcomes; the first match wins (subclasses first).
# Anything else is a bug and propagates.
OUTCOMES: tuple[tuple[type[Exception], Outcome], ...] = (
    (Paced, Outcome.PACED),
    (NotFound, Outcome.NOT_FOUND),
    (UpstreamRejected, Outcome.REJECTED),
    (BreakerOpen, Outcome.CIRCUIT_OPEN),
    (TransientError, Outcome.FAILED),
    (BreakerUnavailable, Outcome.FAILED),
    (SourceError, Outcome.REJECTED),
)
_ENDINGS = tuple(error for error, _ in OUTCOMES)


def outcome_of(error: Exception) -> Outcome:
    """The outcome an exception in `OUTCOMES` stands for."""
    return next(outcome for kind, outcome in OUTCOMES if isinstance(error, kind))


@dataclasses.dataclass(frozen=True)
class CallResult:
    outcome: Outcome
    data: dict | None = None
    error: Exception | None = None

    @property
    def message(self) -> str:
        """What went wrong, in a line."""
        if isinstance(self.error, SourceError):
            return self.error.message
        if isinstance(self.error, BreakerUnavailable):
            return f"breaker state unavailable: {self.error}"
        return str(self.error or "")


def guarded_call(parts: Services, source_name: str, identifier: Identifier, *, batch: bool) -> CallResult:
    """Call one source through its breaker, admitted by the log of starts, and cache what it found.

    `batch`: a batch item's call, admitted only while it leaves the interactive reserve of starts.
    Never raises for an outcome of `OUTCOMES`.
    """
    source = parts.sources[source_name]
    limiter = parts.rate_limiter

    def admitted_fetch(identifier: Identifier) -> dict:
        # Checked after the breaker let the call through, right before it goes out, so the log
        # of starts counts what the upstream sees, give or take the HTTP request's way there.
        wait = limiter.admit(source_name, batch=batch)
        if wait > 0:
            raise Paced(wait)
        return metrics.timed_fetch(source_name, source.fetch, identifier)

    kind, value = str(identifier.type), identifier.value
    try:
        data = parts.breakers.call(source_name, admitted_fetch, identifier)
    except _ENDINGS as error:
        outcome = outcome_of(error)
        if outcome is Outcome.NOT_FOUND:
            parts.cache.set(kind, source_name, value, None, found=False)
        elif outcome is Outcome.CIRCUIT_OPEN:
            metrics.source_request(source_name, "breaker_open")
        elif isinstance(error, BreakerUnavailable):
            metrics.source_request(source_name, "breaker_unavailable")
        return CallResult(outcome, error=error)
    parts.cache.set(kind, source_name, value, data, found=True)
    return CallResult(Outcome.OK, data=data)
