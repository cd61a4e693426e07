"""Admin API behind `Authorization: Bearer $ADMIN_TOKEN`: cache, breakers, feature flags, dead letters."""

from __future__ import annotations

import hmac

from flask import Blueprint, request
from limits import RateLimitItem, parse_many

import dead_letters
import redis_store
from api_errors import ApiError, json_response
from extensions import extension
from feature_flags import FLAGS
from identifiers import InvalidIdentifier, parse
from settings import RATE_LIMIT_OFF

admin = Blueprint("admin", __name__, url_prefix="/api/admin")


def _auth_limits(limit: str) -> list[RateLimitItem]:
    """ADMIN_AUTH_LIMIT (flask-limiter notation, e.g. `10/minute`) as windows; none when off."""
    return [] if limit.strip().lower() in RATE_LIMIT_OFF else parse_many(limit)


def _attempt_keys(windows: list[RateLimitItem]) -> list[str]:
    """The client address's count of admin authentications in each window (fixed windows, TTL'd)."""
    settings = extension("settings")
    address = request.remote_addr or "unknown"  # ProxyFix's, behind TRUSTED_PROXIES (client_limits.py)
    return [redis_store.key(settings, "admin-auth", address, window.get_expiry()) for window in windows]


def _count_attempt(windows: list[RateLimitItem]) -> list[str]:
    """Count this authentication before the token is looked at; 429 when the address is past its limit.

    Counted first and given back when the token is right, rather than counted after a 401 (as
    flask-limiter's `deduct_when` does): its test and its count are two steps, so guesses sent in
    parallel all pass the test before the first failure is counted.  One MULTI here makes the
    test and the count one step, so an address gets at most the limit's guesses per window,
    however many it sends at once.
    """
    keys = _attempt_keys(windows)
    redis = extension("redis")
    with redis.pipeline(transaction=True) as pipe:
        for key, window in zip(keys, windows, strict=True):
            pipe.incr(key)
            pipe.expire(key, window.get_expiry(), nx=True)
            pipe.ttl(key)
        replies = pipe.execute()
    over = [
        max(1, ttl)
        for (count, _, ttl), window in zip(
            (replies[i : i + 3] for i in range(0, len(replies), 3)), windows, strict=True
        )
        if count > window.amount
    ]
    if over:
        raise ApiError(
            429,
            "rate_limited",
            "too many failed admin authentications from this address; try again later",
            headers={"Retry-After": str(max(over))},
        )
    return keys


@admin.before_request
def require_token() -> None:
    """403 while ADMIN_TOKEN is unset (admin is off: no token can work); else 401 unless it matches.

    Each client address may fail ADMIN_AUTH_LIMIT times: past it, every admin request from that
    address is a 429 before its token is looked at (the right one too, so a throttled guesser
    cannot tell a right guess), until the window ends.  A right token never counts.
    """
    settings = extension("settings")
    expected = settings.admin_token
    if not expected:
        raise ApiError(403, "admin_disabled", "the admin API is off: the service has no ADMIN_TOKEN set")
    windows = _auth_limits(settings.admin_auth_limit)
    counted = _count_attempt(windows) if windows else []
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    # An auth scheme is case-insensitive (RFC 7235 2.1): Bearer, bearer and BEARER are one.
    token = credentials.strip(" ") if scheme.lower() == "bearer" else ""
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    if hmac.compare_digest(token.encode(), expected.encode()):
        if counted:
            with extension("redis").pipeline(transaction=False) as pipe:
                for key in counted:
                    pipe.decr(key)  # a right token gives its count back
                pipe.execute()
    else:
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
    cache = extension("cache")
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
    if name not in extension("settings").sources:
        raise ApiError(404, "not_found", f"no source named {name!r}")
    return name


@admin.post("/breakers/<source>/reset")
def reset_breaker(source: str):
    breakers = extension("breakers")
    breakers.reset(_known_source(source))
    return json_response(breakers.status(source).to_dict())


@admin.post("/breakers/<source>/open")
def open_breaker(source: str):
    breakers = extension("breakers")
    breakers.force_open(_known_source(source))
    return json_response(breakers.status(source).to_dict())


@admin.get("/flags")
def list_flags():
    return json_response(extension("flags").all())


@admin.put("/flags/<name>")
def set_flag(name: str):
    flags = extension("flags")
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
    letters = extension("dead_letters")
    return json_response({"count": letters.count(), "items": letters.list(int(limits[0]) if limits else 100)})


@admin.post("/dead-letters/<entry_id>/requeue")
def requeue_dead_letter(entry_id: str):
    requeued = dead_letters.requeue(entry_id)
    if requeued is None:
        raise ApiError(404, "not_found", "no dead letter with this id")
    return json_response(requeued, 202)
