"""Shared fixtures: a private Redis (embedded Valkey) on a free port, settings, clients."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path

import pytest

from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich import redis_store
from enrich.settings import Settings

ROOT = Path(__file__).resolve().parent.parent  # the project directory

pytest_plugins = ["sandbox_fixture", "browser_fixture"]


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll `condition()` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A private embedded Valkey for the session, or TEST_REDIS_URL when set."""
    external = os.environ.get("TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis(free_port(), tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def settings(redis_url) -> Settings:
    """Settings on the test Redis, with a key prefix of this test's own."""
    # Tests post lookups far faster than a person: the per-client limit has its own tests.
    return Settings.from_env(
        {},
        redis_url=redis_url,
        key_prefix=f"t{uuid.uuid4().hex[:10]}",
        lookup_rate_limit="off",
        batch_rate_limit="off",
    )


@pytest.fixture
def redis_client(settings):
    client = redis_store.connect(settings)
    yield client
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def app(settings, redis_client):
    """An in-process app on the test Redis (no worker); `redis_client` deletes its keys afterwards.

    Test modules that need other settings (an admin token, ...) define an `app` of their own.
    """
    from app import close_app, create_app

    app = create_app(settings)
    yield app
    close_app(app)


@pytest.fixture
def make_sandbox_app(settings, redis_client, sandbox_url):
    """Factory of in-process apps on the test Redis whose sources are the session's sandbox (no
    worker): `environ` as from the environment, `changes` as Settings fields."""
    from app import close_app, create_app

    host, port = sandbox_url.rsplit("//", 1)[1].split(":")
    apps = []

    def make(environ: dict | None = None, **changes):
        on_sandbox = Settings.from_env(
            environ or {},
            **{
                "redis_url": settings.redis_url,
                "key_prefix": settings.key_prefix,
                "sandbox_host": host,
                "sandbox_port": int(port),
                "lookup_rate_limit": "off",
                "worker_metrics_port": 0,
                **changes,
            },
        )
        apps.append(create_app(on_sandbox))
        return apps[-1]

    yield make
    for app in apps:
        close_app(app)


@pytest.fixture
def parts(app):
    """The app's parts (Services), inside its app context: what the engine's functions are handed."""
    from enrich.services import services

    with app.app_context():
        yield services()


ADMIN_TOKEN = "admin-test-token"


@pytest.fixture
def make_app(settings, redis_client):
    """Factory of in-process apps on the test Redis with an admin token and the given settings changed."""
    from app import close_app, create_app

    apps = []

    def make(**changes):
        app = create_app(dataclasses.replace(settings, admin_token=ADMIN_TOKEN, **changes))
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


@pytest.fixture
def make_stack(redis_url, sandbox_url, tmp_path):
    """Factory of service deployments (own key prefix, settings from keyword env values)."""
    from stack import Stack

    stacks = []

    def make(**env) -> Stack:
        stack = Stack(redis_url, sandbox_url, tmp_path / f"stack{len(stacks)}", **env)
        stack.tmp.mkdir()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


# Source limits high enough that the limiter never gets in the way of tests about other things.
FAST_LIMITS = {
    f"RATE_LIMIT_{name.upper()}": "60000" for name in ("brasilapi", "receitaws", "opencnpj", "viacep")
}


@pytest.fixture(scope="module")
def running_stack(redis_url, sandbox_url, tmp_path_factory):
    """One web process and one worker shared by a test module (fast limits)."""
    from stack import started

    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("stack"), **FAST_LIMITS) as stack:
        yield stack
