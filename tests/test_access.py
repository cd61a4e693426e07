"""Access: the admin token's comparison, lookup ids nobody can guess, security headers on the API."""

from __future__ import annotations

import base64
import dataclasses
import hmac

import pytest

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich.lookups import new_lookup_id
from enrich.settings import Settings
from enrich.web.pages import SECURITY_HEADERS

ADMIN_TOKEN = "access-admin-token"
CNPJ = "11222333000181"


@pytest.fixture
def app(settings, redis_client):
    app = create_app(dataclasses.replace(settings, admin_token=ADMIN_TOKEN, lookup_rate_limit="3/minute"))
    yield app
    close_app(app)


def test_the_admin_token_is_compared_in_constant_time(app, monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(supplied, expected):
        compared.append((supplied, expected))
        return real(supplied, expected)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    client = app.test_client()
    wrong = client.get("/api/admin/dead-letters", headers={"Authorization": "Bearer access-admin-tokeX"})
    right = client.get("/api/admin/dead-letters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    assert (wrong.status_code, right.status_code) == (401, 200)
    assert compared == [(b"access-admin-tokeX", ADMIN_TOKEN.encode()), (ADMIN_TOKEN.encode(),) * 2]


def test_lookup_ids_carry_at_least_128_random_bits():
    ids = [new_lookup_id() for _ in range(4000)]

    assert len(set(ids)) == len(ids)
    raw = [base64.urlsafe_b64decode(lookup_id + "==") for lookup_id in ids]
    assert all(len(lookup_id) == 22 and len(value) == 16 for lookup_id, value in zip(ids, raw, strict=True))
    # Every one of the 128 bits varies, about half the time: not a counter, a clock or a short secret
    # stretched (4000 samples: one standard deviation of a fair bit's share is 0.008).
    numbers = [int.from_bytes(value, "big") for value in raw]
    for bit in range(128):
        share = sum((number >> bit) & 1 for number in numbers) / len(numbers)
        assert 0.44 < share < 0.56, (bit, share)


def _api_answers(app):
    """One response of every kind the API gives: 200, 202, 400, 401, 404, 413, 429, SSE, the document."""
    client = app.test_client()
    yield "200", client.get("/api/status")
    yield "202", client.post("/api/lookups", json={"identifier": CNPJ})
    yield "400", client.post("/api/lookups", json={"identifier": "<script>"})
    yield "401", client.get("/api/admin/dead-letters")
    yield "404", client.get("/api/lookups/unknown")
    yield "404-events", client.get("/api/lookups/unknown/events")
    yield "413", client.post("/api/lookups", data=b"1" * (65 * 1024), content_type="application/json")
    yield "429", client.post("/api/lookups", json={"identifier": CNPJ})
    created = client.post("/api/lookups", json={"identifier": CNPJ}, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    events = client.get(created.get_json()["links"]["events"] + "?last_event_id=0-0", buffered=False)
    yield "event-stream", events
    events.close()
    yield "openapi", client.get("/api/openapi.json")


def test_every_kind_of_api_answer_carries_the_security_headers(app):
    seen = set()
    for kind, response in _api_answers(app):
        expected_status = int(kind[:3]) if kind[:3].isdigit() else 200
        assert response.status_code == expected_status, (kind, response.get_data(as_text=True)[:200])
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (kind, name)
        seen.add(response.mimetype)
    assert seen == {"application/json", "text/event-stream"}


def test_a_503_carries_the_security_headers_and_admin_off_is_a_403():
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="taccess")
    app = create_app(settings)
    try:
        client = app.test_client()
        down = client.get("/api/lookups/anything")
        admin = client.get("/api/admin/dead-letters", headers={"Authorization": "Bearer "})
    finally:
        close_app(app)
    assert (down.status_code, admin.status_code) == (503, 403)
    assert admin.get_json()["error"] == "admin_disabled" and "ADMIN_TOKEN" in admin.get_json()["message"]
    for response in (down, admin):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, name
