"""Bulk batches when things go wrong or run short: a killed worker, a scarce quota, Redis down, retention."""

from __future__ import annotations

import dataclasses
import signal

import orjson
import pytest
import requests
from conftest import wait_for
from sse_client import Event, read_all
from test_batches import BATCH_ENV, fast_upstreams  # noqa: F401 - the autouse fixture applies here too

import batch_input
import maintenance
from app import close_app, create_app
from embedded_redis import free_port
from settings import Settings


def _finished(stack, batch_id: str, timeout: float) -> dict:
    def finished():
        body = stack.get(f"/api/batches/{batch_id}").json()
        return body if body["finished_at"] else None

    return wait_for(finished, timeout, 0.2, f"batch {batch_id} to finish")


def test_a_batch_finishes_after_its_worker_is_killed(make_stack, sandbox):
    """SIGKILL the only worker mid-batch, start another: every item settles, none twice."""
    stack = make_stack(**BATCH_ENV, VISIBILITY_TIMEOUT="5", BATCH_ITEM_TIMEOUT="40")
    stack.start_worker("w1")
    stack.start_web()
    sandbox.control("viacep", latency_ms=100)
    sandbox.control("brasilapi", latency_ms=100)
    ceps = sandbox.identifiers("cep", 150, seed=111)
    batch_id = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10).json()[
        "id"
    ]
    wait_for(lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 10, 30, 0.05, "some items done")
    stack.kill("w1", signal.SIGKILL)
    stack.start_worker("w2")
    body = _finished(stack, batch_id, 120)
    counts = body["counts"]
    assert body["status"] == "complete"
    assert counts["pending"] == counts["running"] == counts["cancelled"] == 0
    assert sum(counts.values()) == 150, counts  # each item counted once
    assert counts["found"] + counts["not_found"] >= 140, counts  # the in-flight ones were redelivered
    rows = stack.get(f"/api/batches/{batch_id}/results", params={"format": "jsonl"}).text.splitlines()
    assert len(rows) == 150


def test_batch_calls_leave_the_interactive_reserve_to_people(make_stack, sandbox):
    """ViaCEP at one call a second and a batch that wants far more: the batch takes only the tokens
    above the reserve (and skips ViaCEP past BATCH_SOURCE_WAIT), and a person's lookup meanwhile
    gets its ViaCEP call at once."""
    env = {**BATCH_ENV, "RATE_LIMIT_VIACEP": "60", "BATCH_TOKEN_RESERVE": "2", "BATCH_SOURCE_WAIT": "2"}
    stack = make_stack(**env)
    stack.start_worker("w1")
    stack.start_web()
    ceps = sandbox.identifiers("cep", 80, seed=121)
    people = sandbox.identifiers("cep", 4, seed=122)
    created = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10).json()
    batch_id = created["id"]
    wait_for(
        lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 8, 30, 0.05, "the batch under way"
    )

    def viacep_tokens() -> float:
        return stack.app.extensions["rate_limiter"].tokens("viacep")

    for cep in people:
        lookup = stack.wait_status(stack.post_lookup(cep).json()["id"], timeout=10)
        viacep = lookup["sources"]["viacep"]
        assert viacep["state"] in ("ok", "not_found") and viacep["attempts"] == 1, viacep
        events = read_all(f"{stack.web_url}/api/lookups/{lookup['id']}/events")
        states = [
            e.json["state"]
            for e in events
            if isinstance(e, Event) and e.type == "source" and e.json["source"] == "viacep"
        ]
        assert "rate_limited" not in states, states  # it never waited for a token
        assert lookup["completed_at"] - lookup["created_at"] < 2.0
        # The next person comes once the reserve is whole again (people do not come 4 a second).
        wait_for(lambda: viacep_tokens() >= 2, 5, 0.05, "the reserve to refill")
    cancel = {"X-Cancel-Token": created["cancel_token"]}
    cancelled = requests.delete(f"{stack.web_url}/api/batches/{batch_id}", headers=cancel, timeout=10)
    assert cancelled.status_code in (200, 409), cancelled.text  # 409: it finished first
    body = _finished(stack, batch_id, 60)
    rows = [
        orjson.loads(line)
        for line in stack.get(body["links"]["results"], params={"format": "jsonl"}).text.splitlines()
    ]
    skipped = [row for row in rows if row["sources"].get("viacep") == "rate_limited"]
    assert skipped, "the batch never ran short of ViaCEP tokens: the test shows nothing"
    assert all(row["state"] in ("found", "not_found", "cancelled") for row in rows)  # BrasilAPI answered


def test_with_redis_down_batch_requests_get_a_503():
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=0.2)
    app = create_app(settings)
    try:
        client = app.test_client()
        created = client.post("/api/batches", json={"identifiers": ["01310100"]})
        assert created.status_code == 503 and created.get_json()["error"] == "unavailable"
        assert client.get("/api/batches/some-id").status_code == 503
        assert client.delete("/api/batches/some-id").status_code == 503
    finally:
        close_app(app)


def test_cleanup_deletes_batches_past_their_retention(settings, redis_client):
    app = create_app(dataclasses.replace(settings, batch_retention=0.0))
    try:
        with app.app_context():
            store = app.extensions["batches"]
            parsed = batch_input.parse_json(["01310100", "bad"], 10)
            batch_id = store.create(parsed)["id"]
            assert store.status(batch_id) is not None
            report = maintenance.cleanup()
            assert report["removed"]["batches"] == 1
            assert store.status(batch_id) is None
            assert not list(redis_client.scan_iter(match=f"{settings.key_prefix}:batch:{batch_id}*"))
    finally:
        close_app(app)


@pytest.mark.parametrize("reserve", [0, 2])
def test_profiles_and_defaults_of_the_batch_settings(reserve):
    settings = Settings.from_env({"BATCH_TOKEN_RESERVE": str(reserve)})
    assert settings.batch_token_reserve == reserve
    assert Settings.from_env({}).batch_max_rows == 10_000
    assert (
        Settings.from_env({"PROFILE": "high-load"}).batch_concurrency
        > Settings.from_env({}).batch_concurrency
    )


def test_a_person_does_not_join_a_batch_items_lookup_but_a_batch_item_joins_theirs(app, sandbox):
    import pipeline
    from identifiers import parse

    first, second = (parse(value) for value in sandbox.identifiers("cep", 2, seed=131))
    with app.app_context():  # no worker: the lookups stay running
        item, _ = pipeline.start_lookup(first, pipeline.BATCH_PRIORITY)
        person, created = pipeline.start_lookup(first, 5)
        assert created and person.id != item.id  # the person's own lookup, at their priority
        again, created = pipeline.start_lookup(first, pipeline.BATCH_PRIORITY)
        # Batch items still share one lookup's work, each under an id of its own.
        assert not created and again.work_id == item.id and again.id != item.id

        someone, _ = pipeline.start_lookup(second, 5)
        rider, created = pipeline.start_lookup(second, pipeline.BATCH_PRIORITY)
        assert not created and rider.work_id == someone.id and rider.id != someone.id
