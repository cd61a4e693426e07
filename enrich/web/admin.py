"""Admin API behind `Authorization: Bearer $ADMIN_TOKEN`: cache, breakers, feature flags, dead letters."""

from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass

from flask import Blueprint, Flask, request
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from enrich import pipeline
from enrich.api_errors import ApiError, json_response
from enrich.feature_flags import FLAGS
from enrich.identifiers import InvalidIdentifier, parse
from enrich.services import services
from enrich.settings import RATE_LIMIT_OFF

admin = Blueprint("admin", __name__, url_prefix="/api/admin")
SCOPE = "admin-auth"  # the limiter's namespace: {KEY_PREFIX}:LIMITER/admin-auth/<address>/...


@dataclass(frozen=True)
class AuthLimit:
    """ADMIN_AUTH_LIMIT's windows and the limiter that counts failed authentications per address."""

    windows: list[RateLimitItem]
    limiter: MovingWindowRateLimiter

    def over(self, address: str) -> int:
        """Seconds until `address` may try again (0: it is not past its limit); counts nothing."""
        waits = [
            self.limiter.get_window_stats(window, SCOPE, address).reset_time - time.time()
            for window in self.windows
            if not self.limiter.test(window, SCOPE, address)
        ]
        return max(1, math.ceil(max(waits))) if waits else 0

    def fail(self, address: str) -> int:
        """Count a failed authentication; seconds until `address` may try again when it is past its limit."""
        refused = [window for window in self.windows if not self.limiter.hit(window, SCOPE, address)]
        if not refused:
            return 0
        reset = max(self.limiter.get_window_stats(window, SCOPE, address).reset_time for window in refused)
        return max(1, math.ceil(reset - time.time()))


def init_app(app: Flask) -> None:
    """Register the admin API and, unless ADMIN_AUTH_LIMIT is off, its limit on failed authentications.

    `limits` (flask-limiter's own engine) on the app's Redis pool, used directly rather than as a
    flask-limiter decorator with `deduct_when`: that tests the limit before the view and counts
    after the answer, two steps, so guesses sent at once all pass the test before the first
    failure is counted.  Here a wrong token is counted by one atomic `hit` that also refuses it
    past the limit, and a right one only tests: at most the limit's wrong guesses per window get
    an answer, however many arrive at once, and a right token never uses up the allowance.
    """
    settings = services(app).settings
    app.register_blueprint(admin)
    limit = settings.admin_auth_limit
    if not settings.admin_token or limit.strip().lower() in RATE_LIMIT_OFF:
        return
    storage = RedisStorage(
        settings.effective_redis_url,
        connection_pool=services(app).redis.connection_pool,
        key_prefix=settings.key_prefix,
    )
    services(app).admin_auth_limit = AuthLimit(parse_many(limit), MovingWindowRateLimiter(storage))


@admin.before_request
def require_token() -> None:
    """403 while ADMIN_TOKEN is unset (admin is off: no token can work); else 401 unless it matches.

    Each client address may fail ADMIN_AUTH_LIMIT times in its window: past it, every admin
    request from that address is a 429 with Retry-After (the right token's too, so a throttled
    guesser cannot tell a right guess) until the window frees a slot.  A right token never counts.
    """
    settings = services().settings
    expected = settings.admin_token
    if not expected:
        raise ApiError(403, "admin_disabled", "the admin API is off: the service has no ADMIN_TOKEN set")
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    # An auth scheme is case-insensitive (RFC 7235 2.1): Bearer, bearer and BEARER are one.
    token = credentials.strip(" ") if scheme.lower() == "bearer" else ""
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    right = hmac.compare_digest(token.encode(), expected.encode())
    limit = services().admin_auth_limit
    address = request.remote_addr or "unknown"  # ProxyFix's, behind TRUSTED_PROXIES (client_limits.py)
    wait = (limit.over(address) if right else limit.fail(address)) if limit else 0
    if wait:
        raise ApiError(
            429,
            "rate_limited",
            "too many failed admin authentications from this address; try again later",
            headers={"Retry-After": str(wait)},
        )
    if not right:
        raise ApiError(
            401,
            "unauthorized",
            "admin endpoints need Authorization: Bearer <ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    return body


@admin.post("/cache/invalidate")
def invalidate_cache():
    body = _body()
    cache = services().cache
    unknown = sorted(set(body) - {"all", "type", "identifier"})
    if unknown:
        raise ApiError(
            400, "invalid_request", f"unknown field {unknown[0]!r}; send all, type or type and identifier"
        )
    if "all" in body and (body["all"] is not True or len(body) > 1):
        raise ApiError(400, "invalid_request", 'to invalidate everything send exactly {"all": true}', "all")
    if body.get("all") is True:
        return json_response({"generation": cache.bump_generation()})
    kind = body.get("type")
    if kind not in ("cnpj", "cep"):  # a CPF is never cached (cpf_answers.py)
        raise ApiError(
            400, "invalid_request", 'send {"all": true}, {"type"} or {"type", "identifier"}', "type"
        )
    if "identifier" in body:
        if not isinstance(body["identifier"], str):
            raise ApiError(400, "invalid_request", "identifier must be a string", "identifier")
        try:
            identifier = parse(body["identifier"], kind)
        except InvalidIdentifier as error:
            raise ApiError(400, "invalid_identifier", error.message, error.field) from error
        return json_response({"deleted": cache.invalidate(kind, identifier.value)})
    return json_response({"deleted": cache.invalidate(kind)})


def _known_source(name: str) -> str:
    if name not in services().settings.sources:
        raise ApiError(404, "not_found", f"no source named {name!r}")
    return name


@admin.post("/breakers/<source>/reset")
def reset_breaker(source: str):
    breakers = services().breakers
    breakers.reset(_known_source(source))
    return json_response(breakers.status(source).to_dict())


@admin.post("/breakers/<source>/open")
def open_breaker(source: str):
    breakers = services().breakers
    breakers.force_open(_known_source(source))
    return json_response(breakers.status(source).to_dict())


@admin.get("/flags")
def list_flags():
    return json_response(services().flags.all())


@admin.put("/flags/<name>")
def set_flag(name: str):
    flags = services().flags
    if name not in FLAGS:
        raise ApiError(404, "not_found", f"no feature flag named {name!r} (flags: {', '.join(FLAGS)})")
    body = _body()
    if set(body) != {"enabled"} or not (body["enabled"] is None or isinstance(body["enabled"], bool)):
        raise ApiError(
            400,
            "invalid_request",
            'send {"enabled": true}, {"enabled": false} or {"enabled": null} (back to the setting)',
            "enabled",
        )
    return json_response({"name": name, **flags.set(name, body["enabled"])})


@admin.get("/dead-letters")
def list_dead_letters():
    unknown = sorted(set(request.args) - {"limit"})
    if unknown:
        raise ApiError(
            400, "invalid_request", f"unknown query parameter {unknown[0]!r}; only limit is accepted"
        )
    limits = request.args.getlist("limit")
    if len(limits) > 1 or (
        limits and not (limits[0].isascii() and limits[0].isdigit() and 1 <= int(limits[0]) <= 1000)
    ):
        raise ApiError(400, "invalid_request", "limit must be one whole number from 1 to 1000", "limit")
    letters = services().dead_letters
    return json_response({"count": letters.count(), "items": letters.list(int(limits[0]) if limits else 100)})


@admin.post("/dead-letters/<entry_id>/requeue")
def requeue_dead_letter(entry_id: str):
    requeued = pipeline.requeue_dead_letter(services(), entry_id)
    if requeued is None:
        raise ApiError(404, "not_found", "no dead letter with this id")
    return json_response(requeued, 202)
