"""Per-client rate limit on lookup creation: flask-limiter with its counters in the service's Redis.

The counters live in Redis, so the limit holds across every web process and machine.  The
client is the connection's address; behind `TRUSTED_PROXIES` reverse proxies it is taken from
X-Forwarded-For (werkzeug's ProxyFix), never from a header a client could set on its own.
"""

from __future__ import annotations

from flask import Flask, current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import parse_many
from werkzeug.middleware.proxy_fix import ProxyFix

limiter = Limiter(key_func=get_remote_address)


OFF = ("", "off", "none")


def lookup_rate_limit() -> str:
    """LOOKUP_RATE_LIMIT, e.g. "60/minute" (flask-limiter's notation; "off" turns the limit off)."""
    if no_lookup_limit():
        return "1/second"  # never applied (exempt_when), but flask-limiter parses the value before asking
    return current_app.extensions["settings"].lookup_rate_limit


def no_lookup_limit() -> bool:
    return current_app.extensions["settings"].lookup_rate_limit.strip().lower() in OFF


def init_app(app: Flask) -> None:
    settings = app.extensions["settings"]
    if settings.lookup_rate_limit.strip().lower() not in OFF:
        parse_many(settings.lookup_rate_limit)  # a typo fails at start-up, not as a 500 per request
    app.config.update(
        RATELIMIT_STORAGE_URI=settings.effective_redis_url,
        # The app's own bounded pool: no extra connections per web process, the same timeouts.
        RATELIMIT_STORAGE_OPTIONS={"connection_pool": app.extensions["redis"].connection_pool},
        RATELIMIT_KEY_PREFIX=f"{settings.key_prefix}:limits",
        RATELIMIT_STRATEGY="moving-window",
        RATELIMIT_HEADERS_ENABLED=True,
        # Redis down: let the request through to its own defined answer (a 503), not a 500 here.
        RATELIMIT_SWALLOW_ERRORS=True,
    )
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    limiter.init_app(app)
