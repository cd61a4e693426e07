"""The Origin check: another site's page cannot make a visitor's browser create, change or cancel anything."""

from __future__ import annotations

import io

import pytest
import requests
from conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CSV = "identifier\n11222333000181\n"
EVIL = "http://evil.example"


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def post_csv(client, **headers):
    """A simple request: a browser sends a text/plain POST from any page without asking first."""
    return client.post("/api/batches", data=CSV, content_type="text/plain", headers=headers)


def assert_cross_origin(response) -> None:
    assert response.status_code == 403, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == "cross_origin" and "ALLOWED_ORIGINS" in body["message"], body


def test_a_batch_posted_from_another_sites_page_is_refused_whatever_its_body(client, redis_client, settings):
    assert_cross_origin(post_csv(client, Origin=EVIL))
    multipart = {"file": (io.BytesIO(CSV.encode()), "batch.csv")}
    assert_cross_origin(
        client.post(
            "/api/batches", data=multipart, content_type="multipart/form-data", headers={"Origin": EVIL}
        )
    )
    assert_cross_origin(client.post("/api/batches", json={"identifiers": [CSV]}, headers={"Origin": EVIL}))
    assert_cross_origin(
        client.post("/api/lookups", json={"identifier": "11222333000181"}, headers={"Origin": EVIL})
    )
    batch_keys = f"{settings.key_prefix}:batch:*"
    assert not list(redis_client.scan_iter(match=batch_keys))  # nothing was created
    assert post_csv(client).status_code == 202 and list(redis_client.scan_iter(match=batch_keys))


def test_an_opaque_origin_null_is_refused(client):
    assert_cross_origin(post_csv(client, Origin="null"))


def test_without_an_origin_a_referer_from_another_site_is_refused(client):
    assert_cross_origin(post_csv(client, Referer=f"{EVIL}/page.html?x=1"))
    assert_cross_origin(post_csv(client, Referer="android-app://evil.example/"))  # not an http(s) page


def test_the_services_own_pages_and_clients_without_a_page_are_accepted(client):
    # The test client's requests go to http://localhost, as the service sees them.
    assert post_csv(client, Origin="http://localhost").status_code == 202
    assert post_csv(client, Origin="HTTP://LocalHost:80").status_code == 202  # normalised
    assert post_csv(client, Referer="http://localhost/batches").status_code == 202
    # curl, scripts and the CLI send neither Origin nor Referer: no browser is involved.
    assert post_csv(client).status_code == 202
    assert client.post("/api/lookups", json={"identifier": "nope"}).status_code == 400
    assert_cross_origin(post_csv(client, Origin="https://localhost"))  # another scheme is another origin
    assert_cross_origin(post_csv(client, Origin="http://localhost:8080"))  # and another port
    # An Origin wins over a same-origin Referer: the Referer is only a stand-in.
    assert_cross_origin(post_csv(client, Origin=EVIL, Referer="http://localhost/"))


def test_an_origin_in_allowed_origins_is_accepted(make_app):
    client = make_app(allowed_origins="https://app.example.com:443, http://localhost:3000").test_client()
    assert post_csv(client, Origin="https://app.example.com").status_code == 202
    assert post_csv(client, Origin="http://localhost:3000").status_code == 202
    assert post_csv(client, Referer="https://APP.example.com/batch?id=1").status_code == 202
    assert_cross_origin(post_csv(client, Origin="http://localhost:3001"))
    assert_cross_origin(post_csv(client, Origin="http://app.example.com"))
    assert_cross_origin(post_csv(client, Origin=EVIL))


def test_a_malformed_allowed_origin_fails_at_start(make_app):
    with pytest.raises(ValueError, match="ALLOWED_ORIGINS"):
        make_app(allowed_origins="app.example.com")


def test_state_changes_on_every_route_are_guarded_and_reads_never_are(client):
    flags = "/api/admin/flags/cache"
    assert_cross_origin(client.put(flags, json={"enabled": False}, headers={**ADMIN, "Origin": EVIL}))
    assert (
        client.get("/api/admin/flags", headers=ADMIN).get_json()["cache"]["source"] == "settings"
    )  # unchanged
    assert_cross_origin(client.delete(flags, headers={**ADMIN, "Origin": EVIL}))
    assert_cross_origin(
        client.post("/api/admin/cache/invalidate", json={"all": True}, headers={"Origin": EVIL})
    )
    assert_cross_origin(
        client.patch(flags, json={"enabled": False}, headers={**ADMIN, "Referer": f"{EVIL}/"})
    )
    assert_cross_origin(client.post("/", data="x", headers={"Origin": EVIL}))  # pages included
    same = client.put(flags, json={"enabled": None}, headers={**ADMIN, "Origin": "http://localhost"})
    assert same.status_code == 200
    for method in ("GET", "HEAD", "OPTIONS"):
        response = client.open("/api/status", method=method, headers={"Origin": EVIL, "Referer": f"{EVIL}/"})
        assert response.status_code == 200, (method, response.status_code)
    assert client.get("/api/lookups/unknown", headers={"Origin": "null"}).status_code == 404


def test_a_forged_x_forwarded_host_does_not_make_another_site_same_origin(client):
    forged = {"Origin": EVIL, "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    assert_cross_origin(post_csv(client, **forged))
    assert_cross_origin(post_csv(client, **{"Origin": "https://localhost", "X-Forwarded-Proto": "https"}))


def test_behind_trusted_proxies_the_forwarded_scheme_and_host_are_the_origin(make_app):
    client = make_app(trusted_proxies=1, allowed_hosts="app.example.com").test_client()
    proxied = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "app.example.com",
    }
    assert post_csv(client, Origin="https://app.example.com", **proxied).status_code == 202
    assert post_csv(client, Referer="https://app.example.com/batches", **proxied).status_code == 202
    assert_cross_origin(post_csv(client, Origin="http://localhost", **proxied))  # the proxy's side is not it
    assert_cross_origin(post_csv(client, Origin=EVIL, **proxied))


@pytest.mark.slow
def test_over_http_a_cross_site_batch_is_refused_and_the_services_own_page_is_not(make_stack):
    stack = make_stack()
    url = stack.start_web()

    def post(**headers) -> requests.Response:
        return requests.post(
            f"{url}/api/batches", data=CSV, headers={"Content-Type": "text/plain", **headers}, timeout=10
        )

    refused = post(Origin=EVIL)
    assert refused.status_code == 403 and refused.json()["error"] == "cross_origin", refused.text
    assert post(Origin="null").status_code == 403
    files = {"file": ("batch.csv", CSV.encode(), "text/csv")}
    multipart = requests.post(f"{url}/api/batches", files=files, headers={"Origin": EVIL}, timeout=10)
    assert multipart.status_code == 403, multipart.text
    assert post(Origin=url).status_code == 202, "the service's own page"
    assert post().status_code == 202, "curl: no Origin, no Referer"
    # gunicorn believes X-Forwarded-Proto from 127.0.0.1 by default; only TRUSTED_PROXIES may make it count.
    https = url.replace("http://", "https://")
    assert post(Origin=https, **{"X-Forwarded-Proto": "https"}).status_code == 403
    assert post(Origin=EVIL, **{"X-Forwarded-Host": "evil.example"}).status_code == 403


def test_a_host_not_in_allowed_hosts_is_refused_whatever_it_asks(make_app):
    # DNS rebinding: a page at rebind.evil.example whose name now points at the service sends its
    # own name as Host and Origin, which would look same-origin.  Flask's TRUSTED_HOSTS refuses it.
    client = make_app().test_client()  # ALLOWED_HOSTS' default: localhost and 127.0.0.1
    rebound = {"Host": "rebind.evil.example:8000", "Origin": "http://rebind.evil.example:8000"}
    refused = post_csv(client, **rebound)
    assert refused.status_code == 400 and refused.get_json()["error"] == "bad_request", refused.data
    assert client.get("/api/status", headers={"Host": "rebind.evil.example:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1:8000", "localhost"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    anywhere = make_app(allowed_hosts="*").test_client()
    assert anywhere.get("/healthz", headers={"Host": "rebind.evil.example"}).status_code == 200
