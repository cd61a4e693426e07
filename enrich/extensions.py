"""Reaching the shared parts (settings, Redis, cache, breakers, ...) kept in `app.extensions`."""

from __future__ import annotations

from typing import Any

from flask import current_app


def extension(name: str) -> Any:
    """The part registered as `name` on the current app (e.g. "cache", "lookups", "celery")."""
    return current_app.extensions[name]
