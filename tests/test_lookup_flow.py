"""End to end on real processes: gunicorn, a Celery worker, Redis and the sandbox over HTTP."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests
from conftest import wait_for

from enrich.services import services


@pytest.mark.parametrize(
    ("identifier", "kind", "sources"),
    [
        ("11.222.333/0001-81", "cnpj", {"brasilapi", "receitaws", "opencnpj"}),
        ("12.abc.345/01de-35", "cnpj", {"brasilapi", "opencnpj"}),  # ReceitaWS has no alphanumeric CNPJs
        ("01310-100", "cep", {"brasilapi", "viacep"}),
    ],
)
def test_lookup_completes_then_is_served_from_cache(running_stack, sandbox, identifier, kind, sources):
    first = running_stack.post_lookup(identifier)
    assert first.status_code == 202, first.text
    assert first.json()["type"] == kind and set(first.json()["tasks"]) == sources
    done = running_stack.wait_status(first.json()["id"])
    assert {name: s["state"] for name, s in done["sources"].items()} == dict.fromkeys(sources, "ok")
    assert done["result"] is not None and done["progress"] == {"done": len(sources), "total": len(sources)}
    calls = sum(sandbox.served(name) for name in sources)

    again = running_stack.post_lookup(identifier)
    assert again.status_code == 200 and again.json()["cached"] is True
    assert again.json()["result"] == done["result"]
    assert sum(sandbox.served(name) for name in sources) == calls  # no upstream call for a cache hit

    # The finished lookup released its single-flight entry: a refresh starts a new lookup.
    refreshed = running_stack.post_lookup(identifier, refresh=True)
    assert refreshed.status_code == 202 and refreshed.json()["id"] != first.json()["id"]


def test_company_lookup_cross_checks_its_cep(running_stack, sandbox):
    done = running_stack.wait_status(running_stack.post_lookup("11222333000181", refresh=True).json()["id"])
    checks = {check["name"]: check["status"] for check in done["checks"]}
    assert checks["active"] in ("pass", "fail")
    assert checks["cep_valid"] == "pass" and checks["cep_matches_city"] == "pass"
    assert checks["sources_agree:razao_social"] == "pass"
    by_name = {check["name"]: check for check in done["checks"]}
    cep = done["result"]["endereco"]["cep"]
    assert by_name["cep_valid"]["code"] == "cep_exists" and by_name["cep_valid"]["params"] == {"cep": cep}
    assert by_name["sources_agree:razao_social"]["params"] == {"count": 3}


def test_unknown_identifier_settles_not_found_and_is_cached(running_stack, sandbox):
    cep = sandbox.unknown("cep", seed=7)
    done = running_stack.wait_status(running_stack.post_lookup(cep).json()["id"])
    assert {s["state"] for s in done["sources"].values()} == {"not_found"}
    assert done["result"] is None
    again = running_stack.post_lookup(cep)
    assert again.status_code == 200 and again.json()["cached"] is True


def test_concurrent_requests_for_one_identifier_share_one_lookup(running_stack, sandbox):
    sandbox.control("brasilapi", latency_ms=300)  # keep the first lookup in flight while the rest arrive
    cnpj = sandbox.identifiers("cnpj", 1, seed=99)[0]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: running_stack.post_lookup(cnpj), range(20)))
    ids = {response.json()["id"] for response in responses}
    # One lookup's work; each request under an id of its own (lookups.py: aliases).
    assert len(ids) == 20 and {response.status_code for response in responses} == {202}
    store = services(running_stack.app).lookups
    assert len({store.get(lookup_id).work_id for lookup_id in ids}) == 1
    running_stack.wait_status(ids.pop())
    stats = sandbox.stats()["upstreams"]
    assert stats["receitaws"]["requests"] == 1 and stats["opencnpj"]["requests"] == 1
    # BrasilAPI: one CNPJ call, plus one CEP call when the company's CEP check found it uncached.
    assert stats["brasilapi"]["requests"] + stats["viacep"]["requests"] == 2


def test_task_status_reports_each_source_task(running_stack, sandbox):
    created = running_stack.post_lookup(sandbox.identifiers("cep", 1, seed=5)[0]).json()
    running_stack.wait_status(created["id"])
    for source, task_id in created["tasks"].items():
        body = running_stack.get(f"/api/tasks/{task_id}").json()
        assert body["state"] == "SUCCESS" and body["lookup_id"] == created["id"]
        assert body["name"] == "job_queue.fetch_source" and body["date_done"]
        assert body["result"]["source"] == source
    assert running_stack.get("/api/tasks/not-a-task-we-issued").status_code == 404


def test_events_stream_replays_the_lookup_until_complete(running_stack, sandbox):
    created = running_stack.post_lookup(sandbox.identifiers("cep", 1, seed=3)[0]).json()
    response = requests.get(f"{running_stack.web_url}{created['links']['events']}", stream=True, timeout=20)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    types = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            types.append(line.split(":", 1)[1])
    assert types[0] == "snapshot" and types[-1] == "complete" and "source" in types


def test_a_complete_lookups_event_log_expires_soon_and_a_late_stream_still_ends_complete(
    running_stack, sandbox
):
    created = running_stack.post_lookup(sandbox.identifiers("cep", 1, seed=8)[0]).json()
    running_stack.wait_status(created["id"])
    app = running_stack.app
    log_key = services(app).events.stream_key(created["id"])
    ttl = services(app).redis.ttl(log_key)
    assert 0 < ttl <= services(app).settings.event_log_ttl_after_complete
    services(app).redis.delete(log_key)  # as if it had expired
    response = requests.get(f"{running_stack.web_url}{created['links']['events']}", timeout=20)
    types = [line.split(":", 1)[1] for line in response.text.splitlines() if line.startswith("event:")]
    assert types == ["snapshot", "complete"]


def test_worker_heartbeat_makes_the_service_ready(running_stack):
    body = wait_for(lambda: running_stack.get("/readyz").json(), message="readyz")
    assert body["ready"] is True and body["workers"]
