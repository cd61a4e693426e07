"""Per-client rate limit on lookup creation: flask-limiter with its counters in the service's Redis.

The counters live in Redis, so the limit holds across every web process and machine.  The
client is the connection's address; behind `TRUSTED_PROXIES` reverse proxies it is taken from
X-Forwarded-For (werkzeug's ProxyFix), never from a header a client could set on its own.
"""

from __future__ import annotations

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import parse_many
from werkzeug.middleware.proxy_fix import ProxyFix

OFF = ("", "off", "none")
LIMITED_ENDPOINT = "api.create_lookup"  # POST /api/lookups; reads and streams are not limited


def is_off(limit: str) -> bool:
    """LOOKUP_RATE_LIMIT "off" (or empty) turns the limit off."""
    return limit.strip().lower() in OFF


def init_app(app: Flask) -> None:
    """Limit LIMITED_ENDPOINT (already registered) to LOOKUP_RATE_LIMIT per client address.

    One Limiter per app, kept in app.extensions["client_limiter"]: flask-limiter's Limiter holds
    one storage, so a module-level one shared by several apps (tests, tools) would count every
    app's requests in whichever app's Redis was set up last.
    """
    settings = app.extensions["settings"]
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    if is_off(settings.lookup_rate_limit):
        return
    parse_many(settings.lookup_rate_limit)  # a typo fails at start-up, not as a 500 per request
    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri=settings.effective_redis_url,
        # The app's own bounded pool (no extra connections, the same 1 s timeouts); limits puts its
        # key_prefix first, so keys are `{p}:LIMITER/client/{address}/...` like every other key.
        storage_options={
            "connection_pool": app.extensions["redis"].connection_pool,
            "key_prefix": settings.key_prefix,
        },
        key_prefix="client",
        strategy="moving-window",
        headers_enabled=True,
        # Redis unreachable: each process counts in memory (one Redis timeout, then a backend
        # check at growing intervals) and the request goes on to its own defined answer, a 503;
        # never a 500 from here.
        in_memory_fallback=[settings.lookup_rate_limit],
        swallow_errors=True,
    )
    limiter.init_app(app)
    app.extensions["client_limiter"] = limiter
    view = app.view_functions[LIMITED_ENDPOINT]
    app.view_functions[LIMITED_ENDPOINT] = limiter.limit(settings.lookup_rate_limit)(view)
