"""Flask app factory and the JSON API routes (pages live in enrich/web/pages.py, event streams in sse_streaming.py)."""

from __future__ import annotations

import logging
import time

import orjson
import redis
from flask import Blueprint, Flask, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import RequestEntityTooLarge

import cache_manager
import circuit_breaker_manager
import sse_streaming
from enrich import (
    api_errors,
    celery_setup,
    cli,
    log_redaction,
    log_setup,
    lookups,
    maintenance,
    pipeline,
    redis_store,
)
from enrich.api_errors import ApiError, json_response
from enrich.batches.runner import BatchRunner
from enrich.batches.store import BatchStore
from enrich.celery_setup import LookupCelery
from enrich.dead_letters import DeadLetters
from enrich.deferred_calls import DeferredCalls
from enrich.feature_flags import FeatureFlags
from enrich.identifiers import InvalidIdentifier, parse
from enrich.lookups import MAX_LOOKUP_ID_LENGTH, LookupStore
from enrich.near_cache import NearCache
from enrich.rate_limiter import RateLimiter
from enrich.services import Services, services
from enrich.settings import Settings, parse_allowed_hosts
from enrich.sources import build_sources
from enrich.web import (
    admin,
    batch_api,
    client_limits,
    history,
    metrics_endpoint,
    openapi,
    origin_check,
    pages,
)

api = Blueprint("api", __name__)
log = logging.getLogger("api")


class RequestJSON(DefaultJSONProvider):
    """Request bodies read by orjson: nesting past its limit (1,024) is a ValueError, so a malformed
    body's 400, where the standard library's parser lets a RecursionError out of
    `get_json(silent=True)` (a 500 for `[` x 990, two kilobytes)."""

    def loads(self, s: str | bytes, **kwargs: object) -> object:
        return orjson.loads(s)


def create_app(settings: Settings | None = None, celery: LookupCelery | None = None) -> Flask:
    """Build the app; nothing connects to Redis until the first request."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # Only the service's own names (ALLOWED_HOSTS): a DNS-rebound page's requests are a 400.
    app.config["TRUSTED_HOSTS"] = parse_allowed_hosts(settings.allowed_hosts) or None
    app.json = RequestJSON(app)
    app.json.sort_keys = False
    # An empty id (`/api/lookups//events`) is a JSON 404, not werkzeug's HTML 308 to a merged path.
    app.url_map.merge_slashes = False
    # In a Celery worker the app is built after the worker configured logging: it stays "worker".
    log_setup.configure(settings, log_setup.configured_process() or "web")
    client = redis_store.connect(settings)
    flags = FeatureFlags(client, settings)  # before the parts that obey the flags
    near = NearCache(settings, settings.near_cache_size, settings.near_cache_max_age)
    sources, lookup_store = build_sources(settings), LookupStore(client, settings)
    batches = BatchStore(client, settings, lookup_store, sources)  # the store; the runner moves it along
    parts = Services(
        settings=settings,
        redis=client,
        sources=sources,
        flags=flags,
        rate_limiter=RateLimiter(client, settings, flags),
        deferred=DeferredCalls(client, settings),
        cache=cache_manager.Cache(client, settings, near if settings.near_cache_size else None, flags),
        breakers=circuit_breaker_manager.BreakerManager(client, settings, flags),
        lookups=lookup_store,
        events=sse_streaming.EventLog(client, settings),
        event_hub=sse_streaming.EventHub(settings),
        dead_letters=DeadLetters(client, settings),
        batches=batches,
        celery=celery or LookupCelery(settings, flask_app=app),
    )
    parts.batch_runner = BatchRunner(parts, batch_api.batch_links)  # its statuses carry the routes' links
    parts.register(app)
    app.register_blueprint(sse_streaming.sse)  # /api/lookups/<id>/events
    api_errors.init_app(app)
    origin_check.init_app(app)  # the first hook: a cross-site POST is refused before it counts
    app.before_request(batch_api.batch_body_limit)  # before anything reads a body
    app.before_request(whole_body_or_413)
    app.register_blueprint(api)
    batch_api.init_app(app)  # /api/batches
    app.register_blueprint(history.history_api)  # GET /api/status/history
    admin.init_app(app)  # /api/admin and its limit on failed authentications
    client_limits.init_app(app)  # after the api and admin blueprints, which it limits
    app.register_blueprint(openapi.docs)
    metrics_endpoint.init_app(app)  # GET /metrics
    app.register_blueprint(pages.pages)
    pages.init_app(app)
    cli.init_app(app)  # the `flask` commands (enrich/cli/)
    return app


# Form bodies are left to werkzeug's form parser, which reads until the end and so does raise 413.
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def whole_body_or_413() -> None:
    """A body sent without a Content-Length (chunked) is read here, whole, or refused 413.

    werkzeug caps such a stream at the request's limit but raises only on a read past it, and a
    body read in one go stops at the limit: a chunked upload over the limit was cut there and
    accepted (a batch lost its last 492 rows, or got its last line cut mid-value).  So the body is
    read up to the limit and one more byte is asked of the server's stream: anything there is a 413.
    """
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if not chunked or "wsgi.input_terminated" not in request.environ:
        return  # a Content-Length over the limit is werkzeug's 413 already; neither: no body
    if request.mimetype in FORM_TYPES:
        return
    limit = request.max_content_length  # the endpoint's (batch_api.batch_body_limit)
    data = request.get_data(cache=True)
    if limit is not None and len(data) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def close_app(app: Flask) -> None:
    """Stop the app's background threads (near cache, event hub) and close its connections."""
    near = services(app).cache.near
    if near is not None:
        near.stop()
    services(app).event_hub.stop()
    services(app).celery.close()
    services(app).redis.close()


def _json_body() -> dict:
    if not request.is_json:
        raise ApiError(400, "invalid_request", "send a JSON object with Content-Type: application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    return body


def _lookup_request(body: dict) -> tuple:
    raw_type = body.get("type")
    if raw_type is not None and not isinstance(raw_type, str):
        raise ApiError(400, "invalid_request", "type must be one of cnpj, cep, cpf", "type")
    priority = body.get("priority", 5)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 10:
        raise ApiError(
            400, "invalid_request", "priority must be an integer from 1 to 10 (10 most urgent)", "priority"
        )
    refresh = body.get("refresh", False)
    if not isinstance(refresh, bool):
        raise ApiError(400, "invalid_request", "refresh must be true or false", "refresh")
    if "identifier" not in body:
        raise ApiError(400, "invalid_request", "identifier is required", "identifier")
    if not isinstance(body["identifier"], str):
        raise ApiError(400, "invalid_request", "identifier must be a string", "identifier")
    try:
        identifier = parse(body["identifier"], raw_type)
    except InvalidIdentifier as error:
        code = "invalid_request" if error.field == "type" else "invalid_identifier"
        raise ApiError(400, code, error.message, error.field) from error
    return identifier, priority, refresh


@api.post("/api/lookups")
def create_lookup():
    identifier, priority, refresh = _lookup_request(_json_body())
    lookup, created = pipeline.start_lookup(services(), identifier, priority, refresh)
    status = 200 if lookup.status == lookups.LookupStatus.COMPLETE else 202
    outcome = ("cached" if status == 200 else "started") if created else "joined"
    if not lookup.id:
        outcome = "answered"  # a CPF, from the number alone
    # A cached answer is DEBUG: at INFO its line cost a sixth of the cached path's throughput
    # (docs/benchmarks.md), and enrich_lookups_total{outcome="cached"} counts them anyway.
    level = logging.DEBUG if outcome in ("cached", "answered") else logging.INFO
    with log_setup.bind(lookup_id=lookup.id):
        log.log(
            level,
            "lookup %s %s (%s, priority %d)",
            outcome,
            log_redaction.mask_identifier(lookup.type, lookup.identifier),
            lookup.type,
            priority,
            extra={"outcome": outcome, "lookup_type": lookup.type, "priority": priority},
        )
    headers = {"Location": f"/api/lookups/{lookup.id}"} if lookup.id else {}  # a CPF has no record
    return json_response(lookup.encoded or lookup.to_dict(), status, headers)


def _get_lookup(lookup_id: str) -> lookups.Lookup:
    lookup = services().lookups.get(lookup_id) if len(lookup_id) <= MAX_LOOKUP_ID_LENGTH else None
    if lookup is None:
        raise ApiError(404, "not_found", "no lookup with this id (unknown or expired)")
    return lookup


@api.get("/api/lookups/<lookup_id>")
def get_lookup(lookup_id: str):
    lookup = _get_lookup(lookup_id)
    return json_response(lookup.encoded or lookup.to_dict())


@api.get("/api/tasks/<task_id>")
def task_status(task_id: str):
    body = (
        celery_setup.task_status(services().celery, services().lookups, task_id)
        if len(task_id) <= 64
        else None
    )
    if body is None:
        raise ApiError(404, "not_found", "no task with this id was issued by the service")
    return json_response(body)


@api.get("/api/status")
def status():
    breakers = {name: s.to_dict() for name, s in services().breakers.status_all().items()}
    return json_response(
        {
            "time": time.time(),
            "breakers": breakers,
            "rate_limits": services().rate_limiter.status_all(),
            "queues": {
                "by_priority": maintenance.queue_depths(services()),
                "deferred": services().deferred.pending(),
            },
            "workers": maintenance.live_workers(services()),
            "cache": services().cache.stats(),
            "dead_letters": services().dead_letters.count(),
            "batches": services().batches.cluster_stats(),
            "flags": {name: flag["enabled"] for name, flag in services().flags.all().items()},
            "health_check": maintenance.last_report(services(), "health"),
            "cleanup": maintenance.last_report(services(), "cleanup"),
            "event_streams": services().event_hub.stats(),
        }
    )


@api.get("/healthz")
def healthz():
    return json_response({"status": "ok"})


@api.get("/readyz")
def readyz():
    checks = {"redis": False, "workers": []}
    try:
        services().redis.ping()
        checks["redis"] = True
        checks["workers"] = maintenance.live_workers(services())
    except redis.RedisError as error:
        checks["error"] = f"Redis unreachable: {error}"
    ready = checks["redis"] and bool(checks["workers"])
    return json_response({"ready": ready, **checks}, 200 if ready else 503)
