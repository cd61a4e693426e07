"""The API's named errors and the one handler that turns every error into JSON."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import HTTPException

from circuit_breaker_manager import BreakerUnavailable
from enrich.json_encoding import encode_json

log = logging.getLogger("api")


class ApiError(Exception):
    """An error answered as `{"error", "message"[, "field"]}` with an HTTP status."""

    def __init__(
        self, status: int, error: str, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field
        self.headers = headers or {}


def json_response(body: object, status: int = 200, headers: dict | None = None) -> Response:
    """A JSON response of `body`, or of bytes that `encode_json` made already (sent as they are)."""
    data = body if isinstance(body, bytes) else encode_json(body)
    return Response(data, status=status, headers=headers, mimetype="application/json")


def error_response(
    status: int, error: str, message: str, field: str | None = None, headers: dict | None = None
) -> Response:
    body = {"error": error, "message": message}
    if field:
        body["field"] = field
    return json_response(body, status, headers)


def init_app(app: Flask) -> None:
    """Register the handlers: ApiError, HTTP errors, Redis unreachable (503), anything else (500)."""

    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError) -> Response:
        return error_response(error.status, error.error, error.message, error.field, error.headers)

    @app.errorhandler(RateLimitExceeded)
    def handle_rate_limited(error: RateLimitExceeded) -> Response:
        # flask-limiter adds Retry-After and X-RateLimit-* to this response after the handler.
        return error_response(
            429,
            "rate_limited",
            f"too many requests from this address (limit {error.limit.limit}); try again later",
        )

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> Response:
        name = (error.name or "error").lower().replace(" ", "_")
        return error_response(error.code or 500, name, error.description or name)

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(BreakerUnavailable)
    def handle_redis_down(error: Exception) -> Response:
        log.warning("Redis unavailable: %s", error)
        return error_response(
            503,
            "unavailable",
            "the service's data store is unreachable; try again shortly",
            headers={"Retry-After": "5"},
        )

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")
