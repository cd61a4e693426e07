"""The app's shared parts as one typed object, `Services`, built by `create_app` for the web, the
worker and the command line alike, and read with `services()` (or `services(app)`).

Routes, tasks and commands read it; the engine's functions are handed it (`parts`).  It is kept in
`app.extensions` under one key, Flask's convention for an extension's state.
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
    from enrich.batches.runner import BatchRunner
    from enrich.batches.store import BatchStore
    from enrich.celery_setup import LookupCelery
    from enrich.dead_letters import DeadLetters
    from enrich.deferred_calls import DeferredCalls
    from enrich.feature_flags import FeatureFlags
    from enrich.lookups import LookupStore
    from enrich.rate_limiter import RateLimiter
    from enrich.settings import Settings
    from enrich.sources import Source
    from enrich.web.admin import AuthLimit
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
    celery: LookupCelery  # the worker's runs the tasks; the web's only sends them
    batch_runner: BatchRunner | None = None  # built on these parts, once they exist
    # The web's own: per-client limits (web.client_limits) and failed admin logins (web.admin).
    client_limiter: Limiter | None = None
    admin_auth_limit: AuthLimit | None = None

    def register(self, app: Flask) -> None:
        """Keep this object in `app.extensions`."""
        app.extensions[KEY] = self


def services(app: Flask | None = None) -> Services:
    """The shared parts of `app` (default: the current app)."""
    return (app or current_app).extensions[KEY]
