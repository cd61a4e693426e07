"""No secret (the admin token, a Redis password) ever appears in a log line or a response body."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich.services import services
from enrich.settings import Settings

ADMIN_TOKEN = "s3cret-admin-token-4f9a"
REDIS_PASSWORD = "s3cret-redis-password-77b1"


def _calls(client):
    yield client.get("/api/admin/dead-letters", headers={"Authorization": "Bearer wrong-token"})
    yield client.get("/api/admin/dead-letters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"})
    yield client.get("/api/admin/dead-letters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    yield client.post(
        "/api/admin/cache/invalidate", json={"all": "yes"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    yield client.post("/api/lookups", json={"identifier": "11222333000181"})
    yield client.get("/api/status")
    yield client.get("/readyz")


@pytest.mark.parametrize("redis_reachable", [True, False], ids=["redis-up", "redis-down"])
def test_secrets_stay_out_of_logs_and_bodies(settings, redis_client, caplog, redis_reachable):
    if redis_reachable:
        app_settings = dataclasses.replace(settings, admin_token=ADMIN_TOKEN)
    else:
        app_settings = Settings.from_env(
            {},
            admin_token=ADMIN_TOKEN,
            key_prefix="tsecret",
            redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
        )
    app = create_app(app_settings)
    caplog.set_level(logging.DEBUG)
    try:
        bodies = [response.get_data(as_text=True) for response in _calls(app.test_client())]
    finally:
        close_app(app)
    assert bodies and caplog.records
    for secret in (ADMIN_TOKEN, REDIS_PASSWORD):
        assert not [body for body in bodies if secret in body]
        assert secret not in caplog.text


def test_a_500_on_an_admin_call_logs_neither_the_token_nor_the_request_headers(
    settings, redis_client, caplog
):
    app = create_app(dataclasses.replace(settings, admin_token=ADMIN_TOKEN))
    letters = services(app).dead_letters

    def broken(limit):
        raise RuntimeError("dead-letter list is corrupt")

    letters.list = broken  # an unexpected failure inside a view that was reached with the token
    caplog.set_level(logging.DEBUG)
    try:
        response = app.test_client().get(
            "/api/admin/dead-letters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
    finally:
        close_app(app)
    assert response.status_code == 500 and response.get_json()["error"] == "internal_error"
    assert "dead-letter list is corrupt" in caplog.text  # the failure is logged...
    assert ADMIN_TOKEN not in caplog.text and ADMIN_TOKEN not in response.get_data(
        as_text=True
    )  # ...not the token
