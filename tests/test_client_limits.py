"""The per-client limit on lookup creation (flask-limiter, counters in Redis)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from app import create_app
from settings import Settings

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
        app.extensions["celery"].close()
        app.extensions["redis"].close()


def post(client, address="10.0.0.1", **headers):
    return client.post("/api/lookups", json=INVALID, environ_base={"REMOTE_ADDR": address}, headers=headers)


def test_the_default_is_60_lookups_a_minute_per_address(make_app):
    assert Settings.from_env({}).lookup_rate_limit == "60/minute"
    client = make_app(lookup_rate_limit="60/minute").test_client()
    answers = [post(client).status_code for _ in range(61)]
    assert answers[:60] == [400] * 60 and answers[60] == 429


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
    second = create_app(first.extensions["settings"])  # another process: same Redis, same prefix
    try:
        assert post(first.test_client()).status_code == 400
        assert post(second.test_client()).status_code == 400
        assert post(first.test_client()).status_code == 429
        assert post(second.test_client()).status_code == 429
    finally:
        second.extensions["celery"].close()
        second.extensions["redis"].close()


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
