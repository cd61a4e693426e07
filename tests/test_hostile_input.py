"""Hostile input never gets a 500, never comes back unescaped, and always gets a clear 400/404/413."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app import close_app, create_app

HOSTILE_IDENTIFIERS = {
    "script tag": "<script>alert(1)</script>",
    "img onerror": '<img src=x onerror="alert(1)">',
    "sql": "11222333000181' OR '1'='1",
    "sql comment": "1; DROP TABLE lookups; --",
    "path traversal": "../../../etc/passwd",
    "encoded traversal": "..%2F..%2Fetc%2Fpasswd",
    "nul": "11222333000181\x00",
    "control characters": "1122\x1b[31m2333000181\x07",
    "10 kB": "1" * 10_000,
    "full-width digits": "１１２２２３３３０００１８１",
    "right-to-left override": "\u202e11222333000181",
    "emoji": "11222333000181\U0001f4a5",
    "empty": "",
    "spaces only": "     ",
}


@pytest.fixture
def client(settings, redis_client):
    assert settings.max_request_bytes == 64 * 1024  # the default
    app = create_app(settings)
    yield app.test_client()
    close_app(app)


def assert_clear_error(response, statuses=(400,)):
    assert response.status_code in statuses, (response.status_code, response.get_data(as_text=True)[:300])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] and len(body["message"]) > 10
    raw = response.get_data()
    assert b"<" not in raw and b">" not in raw, raw[:300]  # anything echoed is escaped
    return body


@pytest.mark.parametrize("value", HOSTILE_IDENTIFIERS.values(), ids=HOSTILE_IDENTIFIERS.keys())
def test_hostile_identifiers_get_a_clear_400(client, value):
    body = assert_clear_error(client.post("/api/lookups", json={"identifier": value}))
    assert body["error"] == "invalid_identifier" and body["field"] == "identifier"


def test_full_width_digits_are_refused_with_the_character_named(client):
    body = assert_clear_error(
        client.post("/api/lookups", json={"identifier": HOSTILE_IDENTIFIERS["full-width digits"]})
    )
    assert "U+FF11" in body["message"]


@pytest.mark.parametrize(
    "payload",
    [
        {"identifier": 11222333000181},
        {"identifier": None},
        {"identifier": ["11222333000181"]},
        {"identifier": {"$gt": ""}},
        {"identifier": True},
        {"identifier": "11222333000181", "type": ["cnpj"]},
        {"identifier": "11222333000181", "type": "<b>cnpj</b>"},
        {"identifier": "11222333000181", "priority": "10"},
        {"identifier": "11222333000181", "priority": 1e308},
        {"identifier": "11222333000181", "refresh": "yes"},
        {},
        [],
        "11222333000181",
        None,
    ],
    ids=lambda payload: orjson.dumps(payload).decode()[:40],
)
def test_wrong_json_types_get_a_clear_400(client, payload):
    assert_clear_error(
        client.post("/api/lookups", data=orjson.dumps(payload), content_type="application/json")
    )


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"", "application/json"),
        (b"{not json", "application/json"),
        (b'{"identifier": "11222333000181"', "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"identifier=11222333000181", "application/x-www-form-urlencoded"),
        (b'{"identifier": "11222333000181"}', "text/plain"),
        (b'{"identifier": "11222333000181"}', None),
    ],
    ids=["empty", "broken", "truncated", "binary", "form", "text-plain", "no-content-type"],
)
def test_missing_or_non_json_bodies_get_a_clear_400(client, data, content_type):
    assert_clear_error(client.post("/api/lookups", data=data, content_type=content_type))


def test_a_body_over_max_request_bytes_gets_413(client):
    body = orjson.dumps({"identifier": "1" * (64 * 1024)})
    assert_clear_error(client.post("/api/lookups", data=body, content_type="application/json"), (413,))


@pytest.mark.parametrize(
    "path",
    [
        "/api/lookups/..%2F..%2Fetc%2Fpasswd",
        "/api/lookups/%00",
        "/api/lookups/" + "a" * 5000,
        "/api/lookups/<script>",
        "/api/lookups/..%2F..%2Fetc%2Fpasswd/events",
        "/api/lookups/%00/events",
        "/api/lookups/" + "a" * 5000 + "/events",
        "/api/lookups//events",  # an empty id: a JSON 404, not werkzeug's HTML redirect to a merged path
        "/api/lookups/./events",
        "/api/tasks/%00",
        "/api/tasks/" + "b" * 5000,
    ],
    ids=lambda path: path[:40],
)
def test_weird_ids_in_paths_get_a_json_404(client, path):
    assert_clear_error(client.get(path), (404,))


@given(st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))))
@hypothesis_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_text_as_identifier_is_answered_without_a_500_or_raw_markup(client, text):
    response = client.post("/api/lookups", json={"identifier": text, "refresh": False})
    assert response.status_code in (200, 202, 400), response.get_data(as_text=True)[:300]
    raw = response.get_data()
    assert b"<" not in raw and b">" not in raw


PATH_TEMPLATES = ["/api/lookups/{}", "/api/lookups/{}/events", "/api/tasks/{}"]


@given(
    template=st.sampled_from(PATH_TEMPLATES),
    weird=st.one_of(
        st.text(min_size=1, max_size=300),
        st.sampled_from(
            [".", "..", "%2e%2e%2f", "%00", "%ff%fe", "a" * 10_000, "<svg onload=alert(1)>", "'--"]
        ),
    ),
)
@hypothesis_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_id_in_a_path_is_a_json_404_without_raw_markup(client, template, weird):
    # Quoted (as a browser would send it) unless it is already an escape sequence we want to send.
    segment = weird if weird.startswith("%") else quote(weird, safe="")
    assert_clear_error(client.get(template.format(segment)), (404,))


ADMIN = {"Authorization": "Bearer hostile-test-token"}


@pytest.fixture
def admin_client(settings, redis_client):
    app = create_app(dataclasses.replace(settings, admin_token="hostile-test-token"))
    yield app.test_client()
    close_app(app)


@pytest.mark.parametrize("value", HOSTILE_IDENTIFIERS.values(), ids=HOSTILE_IDENTIFIERS.keys())
def test_hostile_identifiers_to_the_admin_api_get_a_clear_400(admin_client, value):
    response = admin_client.post(
        "/api/admin/cache/invalidate", json={"type": "cnpj", "identifier": value}, headers=ADMIN
    )
    body = assert_clear_error(response)
    assert body["field"] == "identifier"


@pytest.mark.parametrize(
    "path", ["/api/admin/breakers/<script>x/reset", "/api/admin/breakers/..%2F..%2Fetc/open",
             "/api/admin/dead-letters/%00/requeue", "/api/admin/dead-letters/" + "z" * 5000 + "/requeue"],
    ids=lambda path: path[:40],
)  # fmt: skip
def test_weird_ids_in_admin_paths_get_a_json_404(admin_client, path):
    assert_clear_error(admin_client.post(path, headers=ADMIN), (404,))


@pytest.mark.parametrize("depth", [990, 1100, 20_000])
@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/api/lookups"), ("post", "/api/batches"), ("put", "/api/admin/flags/cache")],
)
def test_deeply_nested_json_is_a_clear_400_never_a_500(admin_client, method, path, depth):
    # The standard library's parser let a RecursionError out of get_json(silent=True): a 500.
    deep = "[" * depth + "]" * depth
    response = getattr(admin_client, method)(path, data=deep, content_type="application/json", headers=ADMIN)
    assert response.status_code == 400, (path, depth, response.data[:200])
    assert response.get_json()["error"] == "invalid_request"
    # Nested inside an object: a batch reads it as one line it cannot use; never a 500.
    inside = '{"identifiers": ' + deep + "}"
    response = getattr(admin_client, method)(
        path, data=inside, content_type="application/json", headers=ADMIN
    )
    assert response.status_code in (202, 400) and response.is_json, (path, depth, response.data[:200])


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_a_413_never_cut_short(make_stack, sandbox):
    import requests

    stack = make_stack(BATCH_MAX_BYTES="60000", MAX_REQUEST_BYTES="4096")
    url = stack.start_web()
    line = b"11222333000181\n"

    def chunked(total: int):  # requests sends a generator with Transfer-Encoding: chunked
        sent = 0
        while sent < total:
            piece = line * min(100, (total - sent) // len(line) or 1)
            sent += len(piece)
            yield piece

    def post(path: str, total: int, content_type: str) -> requests.Response:
        return requests.post(
            f"{url}{path}", data=chunked(total), headers={"Content-Type": content_type}, timeout=30
        )

    over = post("/api/batches", 61_500, "text/csv")  # 4,100 lines, past 60,000 bytes
    assert over.status_code == 413, over.text[:300]
    assert over.json()["error"] == "request_entity_too_large"
    under = post("/api/batches", 45_000, "text/csv")  # 3,000 lines: every one of them read
    assert under.status_code == 202, under.text[:300]
    assert under.json()["lines"] == 3000
    assert post("/api/lookups", 4_500, "application/json").status_code == 413  # other endpoints alike
