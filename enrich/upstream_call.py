"""The guarded upstream call: every call to an upstream takes this one path.

`guarded_call` goes through the source's circuit breaker, is admitted by the rate limiter's log of
starts right before it goes out, fetches, and writes what it found to the cache.  A lookup's
sources (pipeline._SourceCall, batch items' included) and the cross-check's CEP
(pipeline._company_cep) call it; the exceptions that can end a call become outcomes in one table,
`OUTCOMES`.  Taking the call's token comes before and is the caller's, since its policy differs:
a lookup's source may wait for one, the cross-check's CEP takes one only if there is one now.
"""

from __future__ import annotations

import dataclasses
import enum

from circuit_breaker_manager import BreakerOpen, BreakerUnavailable, CallWithdrawn
from enrich import metrics
from enrich.identifiers import Identifier
from enrich.services import Services
from enrich.sources import NotFound, SourceError, TransientError, UpstreamRejected


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
