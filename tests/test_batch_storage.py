"""batches/storage.py: batches reserve the bytes they keep in Redis, under a cap for all and a share per address."""

from __future__ import annotations

import time

import orjson
import pytest

from enrich.services import services


def post(client, rows: list[str], address: str):
    return client.post("/api/batches", json={"identifiers": rows}, headers={"X-Forwarded-For": address})


@pytest.fixture
def small(make_app):
    """Caps of about four and two batches of 300 junk rows; one proxy, so X-Forwarded-For is the address."""
    app = make_app(trusted_proxies=1, batch_storage_max_bytes=200_000, batch_storage_per_client_bytes=100_000)
    return app


JUNK = ["x" * 413 + str(n) for n in range(300)]  # 300 invalid rows of 413+ characters


def test_an_address_past_its_share_gets_503_storage_full_and_others_go_on(small):
    client, storage = small.test_client(), services(small).batches.storage
    statuses = [post(client, JUNK, "198.51.100.1").status_code for _ in range(4)]
    assert statuses[:2] == [202, 202] and 503 in statuses
    refused = post(client, JUNK, "198.51.100.1")
    assert refused.status_code == 503 and refused.get_json()["error"] == "storage_full"
    assert 60 <= int(refused.headers["Retry-After"]) <= 86_400
    assert storage.used()["client:198.51.100.1"] <= 100_000
    # Another address has its own share, until all batches together reach theirs.
    others = [post(client, JUNK, f"198.51.100.{n}").status_code for n in range(2, 8)]
    assert others[:2] == [202, 202] and others[-1] == 503
    assert storage.used()["all"] <= 200_000


def test_stored_invalid_values_are_cut_to_an_identifiers_length(small, redis_client):
    client = small.test_client()
    created = post(client, JUNK[:3], "198.51.100.9").get_json()
    assert created["invalid"][0]["value"] == JUNK[0]  # the 202 tells the uploader the whole line
    lines = services(small).batches.key(created["id"], "lines")
    kept = [orjson.loads(raw) for raw in redis_client.lrange(lines, 0, -1)]
    assert [len(value) for _, value, _, _ in kept] == [64, 64, 64]


def test_cleanup_gives_a_deleted_batchs_bytes_back(small):
    client, batches = small.test_client(), services(small).batches
    for _ in range(2):
        assert post(client, JUNK, "198.51.100.20").status_code == 202
    assert post(client, JUNK, "198.51.100.20").status_code == 503
    with small.app_context():
        assert batches.delete_older_than(time.time() + 1, services(small).events.stream_key) >= 2
    assert "client:198.51.100.20" not in batches.storage.used()
    assert post(client, JUNK, "198.51.100.20").status_code == 202
