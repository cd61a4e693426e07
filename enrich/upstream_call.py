"""The guarded upstream call: every call to an upstream takes this one path.

`guarded_call` goes through the source's circuit breaker, fetches with the rate limiter's send slot
as its gate (taken and slept until once the request is built, confirmed right before its first
byte is written; deferred when it is far), and writes what it found to the cache.  A lookup's
sources (pipeline._SourceCall, batch items' included) and the cross-check's CEP
(pipeline._company_cep) call it; the exceptions that can end a call become outcomes in one table,
`OUTCOMES`.  Taking the call's token comes before and is the caller's, since its policy differs:
a lookup's source may wait for one, the cross-check's CEP takes one only if there is one now.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from circuit_breaker_manager import BreakerOpen, BreakerUnavailable, CallWithdrawn
from enrich import metrics
from enrich.identifiers import Identifier
from enrich.rate_limiter import RateLimiter, SendPermit
from enrich.services import Services
from enrich.sources import NotFound, SourceError, TransientError, UpstreamRejected


class Paced(CallWithdrawn):
    """A call whose send slot was further away than it may sleep, right before going out."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"wait {wait:.3f}s for the rate limit")
        self.wait = wait


class Outcome(enum.StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"  # cached as such
    REJECTED = "rejected"  # the upstream refused the request itself: not retried
    PACED = "paced"  # no request went out: its send slot was too far away
    CIRCUIT_OPEN = "circuit_open"  # no request went out: the breaker refused it
    FAILED = "failed"  # transient (a timeout, a 5xx, a 429, garbage) or the breaker's state unreadable


# The exceptions that end a guarded call, as outcomes; the first match wins (subclasses first).
# A SourceError of no kind above is the upstream refusing the request: recorded, not retried.
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
    origin: object = None  # the cache_manager.EntryVersion that `data` was cached as (Cache.set)

    @property
    def message(self) -> str:
        """What went wrong, in a line."""
        if isinstance(self.error, SourceError):
            return self.error.message
        if isinstance(self.error, BreakerUnavailable):
            return f"breaker state unavailable: {self.error}"
        return str(self.error or "")


class _SlotGate:
    """The rate limiter's send slot as a fetch's `SendGate`: the slot taken and slept until once the
    request is built, confirmed right before its first byte is written (past the breaker, so what
    the upstream sees is what the send slots allow); `Paced` when it is too far away."""

    def __init__(self, limiter: RateLimiter, source: str, batch: bool, not_before: float) -> None:
        self.limiter, self.source, self.batch, self.not_before = limiter, source, batch, not_before
        self.permit: SendPermit | None = None
        self.sent_at = 0.0

    def before_send(self) -> None:
        wait, self.permit = self.limiter.await_send(self.source, batch=self.batch, not_before=self.not_before)
        if wait > 0:
            raise Paced(wait)

    def at_wire(self) -> None:
        self.sent_at = time.perf_counter()  # first: nothing but the check between it and the write
        wait = self.permit.confirm() if self.permit is not None else 0.0
        if wait > 0:
            self.sent_at = 0.0
            raise Paced(wait)


def guarded_call(
    parts: Services, source_name: str, identifier: Identifier, *, batch: bool, not_before: float = 0.0
) -> CallResult:
    """Call one source through its breaker, sent in its send slot, and cache what it found.

    `batch`: a batch item's call, whose send slot leaves the interactive reserve; `not_before`
    (time.time()): when its reserved token is due, the earliest its send slot may be.
    Never raises for an outcome of `OUTCOMES`.
    """
    source = parts.sources[source_name]
    limiter = parts.rate_limiter

    def paced_fetch(identifier: Identifier) -> dict:
        gate = _SlotGate(limiter, source_name, batch, not_before)
        # Each request's outcome and latency, timed from the send (not the wait for its slot).
        started = time.perf_counter()
        try:
            data = source.fetch(identifier, gate=gate)
        except Exception as error:
            if gate.sent_at or isinstance(error, SourceError):  # not a pacing or a Redis error before it
                seconds = time.perf_counter() - (gate.sent_at or started)
                metrics.source_request(source_name, metrics.source_outcome(error), seconds)
            raise
        metrics.source_request(source_name, "ok", time.perf_counter() - (gate.sent_at or started))
        return data

    kind, value = str(identifier.type), identifier.value
    try:
        data = parts.breakers.call(source_name, paced_fetch, identifier)
    except _ENDINGS as error:
        outcome = outcome_of(error)
        if outcome is Outcome.NOT_FOUND:
            parts.cache.set(kind, source_name, value, None, found=False)
        elif outcome is Outcome.CIRCUIT_OPEN:
            metrics.source_request(source_name, "breaker_open")
        elif isinstance(error, BreakerUnavailable):
            metrics.source_request(source_name, "breaker_unavailable")
        return CallResult(outcome, error=error)
    return CallResult(Outcome.OK, data=data, origin=parts.cache.set(kind, source_name, value, data))
