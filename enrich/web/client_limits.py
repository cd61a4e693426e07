"""Per-client rate limits on lookup and batch creation: flask-limiter with its counters in the service's Redis.

(Failed admin authentications have a limit of their own, counted atomically in admin.py.)

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

from enrich.services import services
from enrich.settings import RATE_LIMIT_OFF as OFF

LIMITED_ENDPOINT = "api.create_lookup"  # POST /api/lookups; reads and streams are not limited
BATCH_ENDPOINT = "batch_api.create_batch"  # POST /api/batches, with BATCH_RATE_LIMIT


def is_off(limit: str) -> bool:
    """LOOKUP_RATE_LIMIT "off" (or empty) turns the limit off."""
    return limit.strip().lower() in OFF


def init_app(app: Flask) -> None:
    """Limit LIMITED_ENDPOINT (already registered) to LOOKUP_RATE_LIMIT per client address, and
    BATCH_ENDPOINT to BATCH_RATE_LIMIT.

    One Limiter per app, kept in its services (`client_limiter`): flask-limiter's Limiter holds
    one storage, so a module-level one shared by several apps (tests, tools) would count every
    app's requests in whichever app's Redis was set up last.
    """
    settings = services(app).settings
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    limits = {
        endpoint: limit
        for endpoint, limit in (
            (LIMITED_ENDPOINT, settings.lookup_rate_limit),
            (BATCH_ENDPOINT, settings.batch_rate_limit),
        )
        if not is_off(limit)
    }
    if not limits:
        return
    for limit in limits.values():
        parse_many(limit)  # a typo fails at start-up, not as a 500 per request
    limiter = Limiter(
        key_func=get_remote_address,
        storage_uri=settings.effective_redis_url,
        # The app's own bounded pool (no extra connections, the same 1 s timeouts); limits puts its
        # key_prefix first, so keys are `{p}:LIMITER/client/{address}/...` like every other key.
        storage_options={
            "connection_pool": services(app).redis.connection_pool,
            "key_prefix": settings.key_prefix,
        },
        key_prefix="client",
        strategy="moving-window",
        headers_enabled=True,
        # Redis unreachable: each process counts in memory (one Redis timeout, then a backend
        # check at growing intervals) and the request goes on to its own defined answer, a 503;
        # never a 500 from here.
        # flask-limiter applies the fallback to every route while it lasts: the tighter per-lookup
        # limit alone (a batch limit per hour would throttle every read).
        in_memory_fallback=[limits.get(LIMITED_ENDPOINT) or limits[BATCH_ENDPOINT]],
        swallow_errors=True,
    )
    limiter.init_app(app)
    services(app).client_limiter = limiter
    for endpoint, limit in limits.items():
        # A scope of its own per endpoint: a batch does not use up the address's lookups.
        view = app.view_functions[endpoint]
        app.view_functions[endpoint] = limiter.limit(limit, scope=endpoint)(view)
