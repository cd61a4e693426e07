"""The errors a source call can raise, each saying whether a retry or a circuit breaker should care."""

from __future__ import annotations


class SourceError(Exception):
    """Base of every error a source call can raise; `reason` is a short machine word."""

    reason = "error"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class NotFound(SourceError):
    """The upstream says the identifier does not exist. Final; never counts against a breaker."""

    reason = "not_found"


class UpstreamRejected(SourceError):
    """A 4xx other than 404/429 (the upstream refuses this identifier). Final; not a breaker failure."""

    reason = "rejected"


class TransientError(SourceError):
    """Timeouts, connection errors, 5xx, garbage bodies: retried with backoff, counted by breakers."""

    reason = "transient"


class RateLimited(TransientError):
    """HTTP 429 from the upstream; `retry_after` seconds when it said so."""

    reason = "rate_limited"

    def __init__(self, message: str, status: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class BadResponse(TransientError):
    """The upstream answered with a body that is not what its API documents (HTML, bad JSON, wrong types)."""

    reason = "bad_response"
