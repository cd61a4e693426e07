"""The per-client limit on lookup creation (flask-limiter, counters in Redis)."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich.services import services
from enrich.settings import Settings

INVALID = {"identifier": "not an identifier"}  # a 400 still counts: the limit is on requests


@pytest.fixture
def make_app(settings, redis_client):
    apps = []

    def make(**changes):
        app = create_app(dataclasses.replace(settings, **changes))
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


def post(client, address="10.0.0.1", **headers):
    return client.post("/api/lookups", json=INVALID, environ_base={"REMOTE_ADDR": address}, headers=headers)


def assert_rate_limited(response, limit_text: str) -> None:
    assert response.status_code == 429, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == "rate_limited" and limit_text in body["message"], body
    assert 0 < int(response.headers["Retry-After"]) <= 60


def test_the_default_is_60_lookups_a_minute_per_address(make_app):
    assert Settings.from_env({}).lookup_rate_limit == "60/minute"
    client = make_app(lookup_rate_limit="60/minute").test_client()
    answers = [post(client) for _ in range(61)]
    assert [answer.status_code for answer in answers[:60]] == [400] * 60
    assert_rate_limited(answers[60], "60 per 1 minute")
    assert post(client, address="10.0.0.2").status_code == 400


def test_a_limit_set_in_the_environment_applies(settings, redis_client):
    env = {
        "REDIS_URL": settings.redis_url,
        "KEY_PREFIX": settings.key_prefix,
        "LOOKUP_RATE_LIMIT": "3/minute",
    }
    app = create_app(Settings.from_env(env))
    try:
        client = app.test_client()
        assert [post(client).status_code for _ in range(3)] == [400] * 3
        assert_rate_limited(post(client), "3 per 1 minute")
    finally:
        close_app(app)
    # Counted under the service's key prefix, like every other key.
    # (Other tests' keys may still be counting under their own prefixes: none is without one.)
    keys = [key.decode() for key in redis_client.keys("*LIMITER*")]
    assert [key for key in keys if key.startswith(f"{settings.key_prefix}:LIMITER/client/10.0.0.1/")]
    assert not [key for key in keys if key.startswith("LIMITER")]


def test_each_app_counts_in_its_own_redis_namespace(make_app):
    first = make_app(lookup_rate_limit="1/minute", key_prefix="tlimits-a")
    second = make_app(lookup_rate_limit="1/minute", key_prefix="tlimits-b")  # built after the first
    try:
        assert [post(first.test_client()).status_code for _ in range(2)] == [400, 429]
        assert post(second.test_client()).status_code == 400
    finally:
        for prefix in ("tlimits-a", "tlimits-b"):
            client = services(first).redis
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)


def test_over_the_limit_is_a_json_429_with_retry_after(make_app):
    client = make_app(lookup_rate_limit="3/minute").test_client()
    assert [post(client).status_code for _ in range(3)] == [400] * 3
    response = post(client)
    assert response.status_code == 429
    assert (
        response.get_json()["error"] == "rate_limited" and "3 per 1 minute" in response.get_json()["message"]
    )
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert post(client, address="10.0.0.2").status_code == 400  # another client is not limited
    assert client.get("/api/lookups/some-id", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 404
    assert client.get("/healthz", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200


def test_the_limit_is_shared_by_every_web_process(make_app):
    first = make_app(lookup_rate_limit="2/minute")
    second = create_app(services(first).settings)  # another process: same Redis, same prefix
    try:
        assert post(first.test_client()).status_code == 400
        assert post(second.test_client()).status_code == 400
        assert post(first.test_client()).status_code == 429
        assert post(second.test_client()).status_code == 429
    finally:
        close_app(second)


def test_x_forwarded_for_counts_only_behind_trusted_proxies(make_app):
    direct = make_app(lookup_rate_limit="1/minute").test_client()
    assert post(direct, **{"X-Forwarded-For": "1.1.1.1"}).status_code == 400
    assert (
        post(direct, **{"X-Forwarded-For": "2.2.2.2"}).status_code == 429
    )  # a forged header changes nothing

    proxied = make_app(lookup_rate_limit="1/minute", trusted_proxies=1).test_client()
    assert post(proxied, **{"X-Forwarded-For": "3.3.3.3"}).status_code == 400
    assert post(proxied, **{"X-Forwarded-For": "4.4.4.4"}).status_code == 400  # each client its own count
    assert post(proxied, **{"X-Forwarded-For": "3.3.3.3"}).status_code == 429


def test_off_turns_the_limit_off_and_a_malformed_one_fails_at_start(make_app, caplog):
    assert Settings.from_env({"LOOKUP_RATE_LIMIT": "off"}).lookup_rate_limit == "off"
    client = make_app(lookup_rate_limit="off").test_client()
    assert all(post(client).status_code == 400 for _ in range(70))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text[:500]
    with pytest.raises(ValueError):
        make_app(lookup_rate_limit="sixty a minute")


def test_with_redis_down_the_limit_counts_in_memory_and_lookups_get_their_503(caplog):
    """No 500 from the limiter: it falls back to counting in this process and the view answers 503."""
    settings = Settings.from_env(
        {},
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        key_prefix="tlimits-down",
        lookup_rate_limit="2/minute",
    )
    app = create_app(settings)
    try:
        client = app.test_client()
        answers = []
        for _ in range(3):
            started = time.monotonic()
            response = client.post("/api/lookups", json={"identifier": "11222333000181"})
            answers.append((response, time.monotonic() - started))
    finally:
        close_app(app)
    assert [response.status_code for response, _ in answers] == [503, 503, 429]
    assert answers[0][0].get_json()["error"] == "unavailable"
    assert all(elapsed < 1.0 for _, elapsed in answers), answers
    assert "falling back to in-memory storage" in caplog.text


@pytest.mark.slow
def test_gunicorn_reads_the_limit_from_the_environment_and_answers_429_over_http(make_stack):
    stack = make_stack(LOOKUP_RATE_LIMIT="3/minute")
    stack.start_web()
    answers = [stack.post_lookup("not an identifier") for _ in range(4)]
    assert [answer.status_code for answer in answers] == [400, 400, 400, 429]
    assert answers[3].json()["error"] == "rate_limited" and 0 < int(answers[3].headers["Retry-After"]) <= 60
    assert answers[3].headers["X-RateLimit-Limit"] == "3"
    assert [stack.get("/api/lookups/nothing").status_code for _ in range(5)] == [404] * 5  # reads: unlimited
    assert stack.get("/healthz").status_code == 200


def test_batch_creation_has_a_limit_of_its_own(make_app):
    assert Settings.from_env({}).batch_rate_limit == "30/hour"
    client = make_app(lookup_rate_limit="2/minute", batch_rate_limit="2/hour").test_client()

    def batch(address="10.0.0.1"):
        return client.post("/api/batches", json={"identifiers": []}, environ_base={"REMOTE_ADDR": address})

    assert [batch().status_code for _ in range(2)] == [400, 400]  # an empty batch, counted all the same
    over = batch()
    assert over.status_code == 429 and "2 per 1 hour" in over.get_json()["message"]
    assert batch("10.0.0.2").status_code == 400  # another client is not limited
    # The lookups of the same address are counted apart.
    assert [post(client).status_code for _ in range(3)] == [400, 400, 429]
