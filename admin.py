"""Admin API behind `Authorization: Bearer $ADMIN_TOKEN`: cache, breakers, feature flags, dead letters."""

from __future__ import annotations

import hmac

from flask import Blueprint, request

import dead_letters
from api_errors import ApiError, json_response
from extensions import extension
from feature_flags import FLAGS
from identifiers import InvalidIdentifier, parse

admin = Blueprint("admin", __name__, url_prefix="/api/admin")


@admin.before_request
def require_token() -> None:
    """403 while ADMIN_TOKEN is unset (admin is off: no token can work); else 401 unless it matches."""
    expected = extension("settings").admin_token
    if not expected:
        raise ApiError(403, "admin_disabled", "the admin API is off: the service has no ADMIN_TOKEN set")
    supplied = request.headers.get("Authorization", "")
    token = supplied[7:] if supplied.startswith("Bearer ") else ""
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    if not hmac.compare_digest(token.encode(), expected.encode()):
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
