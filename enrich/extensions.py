"""The app's shared parts as one typed object, `Services`, built by `create_app` for the web, the
worker and the command line alike, and read with `services()` (or `services(app)`).

Each part is also registered under its field's name in `app.extensions`, Flask's convention for an
extension's state, where the tests read them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:  # the parts' modules import this one: their types are for annotations only
    import redis
    from flask_limiter import Limiter

    from cache_manager import Cache
    from circuit_breaker_manager import BreakerManager
    from enrich.batches.store import BatchStore
    from enrich.dead_letters import DeadLetters
    from enrich.deferred_calls import DeferredCalls
    from enrich.feature_flags import FeatureFlags
    from enrich.lookups import LookupStore
    from enrich.rate_limiter import RateLimiter
    from enrich.settings import Settings
    from enrich.sources import Source
    from enrich.web.admin import AuthLimit
    from job_queue import LookupCelery
    from sse_streaming import EventHub, EventLog

KEY = "services"


@dataclasses.dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    sources: dict[str, Source]
    flags: FeatureFlags
    rate_limiter: RateLimiter
    deferred: DeferredCalls
    cache: Cache
    breakers: BreakerManager
    lookups: LookupStore
    events: EventLog
    event_hub: EventHub
    dead_letters: DeadLetters
    batches: BatchStore
    celery: LookupCelery | None = None
    # The web's own: per-client limits (web.client_limits) and failed admin logins (web.admin).
    client_limiter: Limiter | None = None
    admin_auth_limit: AuthLimit | None = None

    def register(self, app: Flask) -> None:
        """Keep this object, and each part under its own name, in `app.extensions`."""
        app.extensions[KEY] = self
        for field in dataclasses.fields(self):
            app.extensions[field.name] = getattr(self, field.name)


def services(app: Flask | None = None) -> Services:
    """The shared parts of `app` (default: the current app)."""
    return (app or current_app).extensions[KEY]
