"""The admin API's authentication: the bearer scheme in any case, and failed tokens limited per address."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests
from conftest import ADMIN_TOKEN

RIGHT = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WRONG = {"Authorization": "Bearer admin-test-tokeX"}


def flags(client, headers: dict, address: str = "10.0.0.1", path: str = "/api/admin/flags"):
    return client.get(path, headers=headers, environ_base={"REMOTE_ADDR": address})


def assert_throttled(response) -> None:
    assert response.status_code == 429, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"] == "rate_limited", response.get_json()
    assert 0 < int(response.headers["Retry-After"]) <= 60


def test_the_eleventh_failed_token_in_a_minute_is_a_429_even_with_the_right_token(
    make_app, redis_client, settings
):
    client = make_app().test_client()  # ADMIN_AUTH_LIMIT's default, 10/minute
    assert [flags(client, WRONG).status_code for _ in range(10)] == [401] * 10
    assert_throttled(flags(client, WRONG))
    # While over the limit, the right token is refused alike: a throttled guesser learns nothing.
    assert_throttled(flags(client, RIGHT))
    invalidate = client.post(
        "/api/admin/cache/invalidate",
        json={"all": True},
        headers=RIGHT,
        environ_base={"REMOTE_ADDR": "10.0.0.1"},
    )
    assert_throttled(invalidate)
    assert flags(client, RIGHT, address="10.0.0.2").status_code == 200  # another address is not
    # Only failures are kept: one moving window, under the prefix, expiring with it (bounded).
    keys = [key.decode() for key in redis_client.keys(f"{settings.key_prefix}:*admin-auth*")]
    assert keys == [f"{settings.key_prefix}:LIMITER/admin-auth/10.0.0.1/10/1/minute"]
    assert 0 < redis_client.ttl(keys[0]) <= 60


def test_failures_on_every_admin_route_add_up(make_app):
    client = make_app(admin_auth_limit="4/minute").test_client()
    paths = ["/api/admin/flags", "/api/admin/dead-letters", "/api/admin/flags", "/api/admin/dead-letters"]
    assert [flags(client, WRONG, path=path).status_code for path in paths] == [401] * 4
    reset = client.post(
        "/api/admin/breakers/viacep/reset", headers=WRONG, environ_base={"REMOTE_ADDR": "10.0.0.1"}
    )
    assert_throttled(reset)


def test_a_right_token_from_another_address_is_not_throttled_by_others_failures(make_app):
    client = make_app(admin_auth_limit="3/minute", trusted_proxies=1).test_client()

    def from_address(address: str, headers: dict):
        return client.get("/api/admin/flags", headers={**headers, "X-Forwarded-For": address})

    assert [from_address("198.51.100.1", WRONG).status_code for _ in range(3)] == [401] * 3
    assert_throttled(from_address("198.51.100.1", WRONG))
    assert from_address("198.51.100.2", RIGHT).status_code == 200
    assert from_address("198.51.100.3", WRONG).status_code == 401  # each address counts its own


def test_right_tokens_never_count_as_failures(make_app):
    client = make_app(admin_auth_limit="3/minute").test_client()
    assert [flags(client, RIGHT).status_code for _ in range(20)] == [200] * 20
    assert client.put("/api/admin/flags/cache", json={"enabled": None}, headers=RIGHT).status_code == 200
    unknown = client.put("/api/admin/flags/nothing", json={"enabled": True}, headers=RIGHT)
    assert unknown.status_code == 404  # an error, but not a failed authentication: not counted
    assert [flags(client, WRONG).status_code for _ in range(3)] == [401] * 3
    assert_throttled(flags(client, WRONG))


def test_off_never_throttles_failed_tokens(make_app):
    client = make_app(admin_auth_limit="off").test_client()
    assert [flags(client, WRONG).status_code for _ in range(30)] == [401] * 30
    assert flags(client, RIGHT).status_code == 200


def test_the_bearer_scheme_is_accepted_in_any_letter_case_and_nothing_else_is(make_app):
    client = make_app(admin_auth_limit="off").test_client()
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert flags(client, {"Authorization": f"{scheme} {ADMIN_TOKEN}"}).status_code == 200, scheme
    for header in (
        f"Basic {ADMIN_TOKEN}",
        f"Bearer{ADMIN_TOKEN}",
        ADMIN_TOKEN,
        f"Token {ADMIN_TOKEN}",
        "Bearer ",
    ):
        response = flags(client, {"Authorization": header})
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", header


@pytest.mark.slow
def test_over_http_failed_tokens_are_throttled_per_address(make_stack):
    stack = make_stack(ADMIN_AUTH_LIMIT="3/minute", TRUSTED_PROXIES="1")
    url = stack.start_web()

    def get(address: str, headers: dict) -> requests.Response:
        return requests.get(
            f"{url}/api/admin/flags", headers={**headers, "X-Forwarded-For": address}, timeout=10
        )

    assert [get("198.51.100.7", WRONG).status_code for _ in range(3)] == [401] * 3
    right = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    over = get("198.51.100.7", right)  # the right token too, while over the limit
    assert over.status_code == 429 and over.json()["error"] == "rate_limited", over.text
    assert 0 < int(over.headers["Retry-After"]) <= 60
    assert get("198.51.100.8", right).status_code == 200

    # Guesses sent all at once get no more tries than guesses sent one by one...
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda _: get("198.51.100.9", WRONG).status_code, range(40)))
    assert sorted(statuses) == [401] * 3 + [429] * 37
    # ...and an operator's right tokens sent all at once never lock their own address out.
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda _: get("198.51.100.10", right).status_code, range(60)))
    assert statuses == [200] * 60 and get("198.51.100.10", WRONG).status_code == 401
