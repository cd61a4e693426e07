"""Bulk batches end to end: gunicorn web, a real Celery worker, the sandbox upstream over HTTP."""

from __future__ import annotations

import csv
import hashlib
import io

import orjson
import pytest
import requests
from conftest import FAST_LIMITS, wait_for
from sse_client import Event, read_all
from test_batch_rows import HYPERLINK_LEAK, formula_cells

from enrich.services import services

# ReceitaWS keeps its real limit (2.85 a minute, the sandbox's quota of 3): batch items skip it
# once its token is gone, as they would in production, and still settle from the other sources.
BATCH_ENV = {
    **{name: value for name, value in FAST_LIMITS.items() if "RECEITAWS" not in name},
    "BATCH_CONCURRENCY": "16",
    "BATCH_POLL_INTERVAL": "0.05",
}


# What a hostile company record says, through the sandbox's override fault (hostile_company).
FORMULAS = {
    "razao_social": '=HYPERLINK("http://x","y")',
    "nome_fantasia": "+cmd|' /C calc'!A0",
    "logradouro": "@SUM(1)",
}


def hostile_company(sandbox, seed: int) -> str:
    """A CNPJ that every CNPJ source names with FORMULAS (its street without a street type)."""
    sandbox.control("brasilapi", override={**FORMULAS, "descricao_tipo_de_logradouro": None})
    sandbox.control("opencnpj", override={**FORMULAS, "tipo_logradouro": None})
    receitaws = dict(zip(("nome", "fantasia", "logradouro"), FORMULAS.values(), strict=True))
    sandbox.control("receitaws", override=receitaws)
    return sandbox.known("cnpj", seed=seed)


def assert_defused_results(csv_text: str, jsonl_text: str) -> None:
    """The results of [hostile company, HYPERLINK_LEAK]: the CSV's formulas defused, the JSONL's raw."""
    assert formula_cells(csv_text) == []
    company, invalid = csv.DictReader(io.StringIO(csv_text))
    assert company["state"] == "found", company
    assert company["razao_social"] == "'" + FORMULAS["razao_social"]
    assert company["nome_fantasia"] == "'+cmd\\|' /C calc'!A0"  # defusedcsv also escapes the DDE pipe
    assert company["logradouro"] == "'@SUM(1)"
    assert invalid["state"] == "invalid" and invalid["input"] == "'" + HYPERLINK_LEAK
    company, invalid = (orjson.loads(line) for line in jsonl_text.splitlines())
    assert {name: company["fields"][name] for name in FORMULAS} == FORMULAS
    assert invalid["input"] == HYPERLINK_LEAK


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    from stack import started

    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("batches"), **BATCH_ENV) as stack:
        yield stack


@pytest.fixture(autouse=True)
def fast_upstreams(sandbox):
    """The sandbox without its quotas but ReceitaWS's (3 a minute), to match BATCH_ENV."""
    for name in ("brasilapi", "opencnpj", "viacep"):
        sandbox.control(name, quota_per_minute=None)
    return sandbox


def _post_csv(stack, text: str, filename: str = "batch.csv") -> requests.Response:
    files = {"file": (filename, text.encode("utf-8"), "text/csv")}
    return requests.post(f"{stack.web_url}/api/batches", files=files, timeout=30)


def _wait_finished(stack, batch_id: str, timeout: float = 120.0) -> dict:
    def finished():
        body = stack.get(f"/api/batches/{batch_id}").json()
        return body if body["finished_at"] else None

    return wait_for(finished, timeout, 0.2, f"batch {batch_id} to finish")


def _csv_rows(stack, batch_id: str) -> list[dict]:
    response = stack.get(f"/api/batches/{batch_id}/results", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


def test_a_thousand_row_batch_completes_with_one_row_per_input_line(stack, sandbox):
    known = sandbox.identifiers("cnpj", 300, seed=71)
    ceps = sandbox.identifiers("cep", 300, seed=72)
    cpfs = sandbox.identifiers("cpf", 200, seed=73)
    values = known + ceps + cpfs
    rows = ["identifier;type"]
    for index in range(1000):
        if index % 50 == 7:
            rows.append("not-an-identifier;")
        elif index >= 800:
            rows.append(f"{values[index - 800]};")  # a duplicate of an earlier row
        else:
            kind = "cnpj" if index < 300 else ("cep" if index < 600 else "cpf")
            rows.append(f"{values[index]};{kind}")
    text = "\ufeff" + "\r\n".join(rows) + "\r\n"

    response = _post_csv(stack, text)
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["lines"] == 1000
    invalid_lines = [entry["line"] for entry in created["invalid"]]
    assert invalid_lines == [index + 2 for index in range(1000) if index % 50 == 7]  # line 1: header
    assert all(entry["value"] == "not-an-identifier" for entry in created["invalid"])
    distinct = {v for i, v in enumerate(values[:800]) if i % 50 != 7}
    assert created["total"] == len(distinct)
    assert created["duplicates"] == 1000 - len(invalid_lines) - len(distinct)
    assert set(created["links"]) >= {"self", "events", "results"}

    body = _wait_finished(stack, created["id"])
    assert body["status"] == "complete"
    counts = body["counts"]
    assert counts["pending"] == counts["running"] == counts["cancelled"] == 0
    results = _csv_rows(stack, created["id"])
    failed = [row for row in results if row["state"] not in ("found", "not_found", "invalid")]
    assert counts["found"] + counts["not_found"] == body["total"], str((counts, failed[0]))  # all answered

    assert len(results) == 1000
    assert [int(row["line"]) for row in results] == list(range(2, 1002))
    for index, row in enumerate(results):
        if index % 50 == 7:
            assert row["state"] == "invalid" and row["error"]
        else:
            assert row["state"] in ("found", "not_found"), row
    found_companies = [row for row in results if row["type"] == "cnpj" and row["state"] == "found"]
    assert found_companies and all(row["razao_social"] and row["uf"] for row in found_companies)
    # A duplicate row answers like the row it repeats.
    assert results[800]["identifier"] == results[0]["identifier"]
    assert results[800]["state"] == results[0]["state"]

    jsonl = stack.get(f"/api/batches/{created['id']}/results", params={"format": "jsonl"})
    lines = [orjson.loads(line) for line in jsonl.text.splitlines()]
    assert len(lines) == 1000 and jsonl.headers["Content-Type"].startswith("application/x-ndjson")
    assert lines[0]["fields"]["razao_social"] == results[0]["razao_social"] or results[0]["state"] != "found"


def test_results_csv_defuses_formulas_and_jsonl_keeps_the_values(stack, sandbox):
    cnpj = hostile_company(sandbox, seed=111)
    response = requests.post(
        f"{stack.web_url}/api/batches", json={"identifiers": [cnpj, HYPERLINK_LEAK]}, timeout=10
    )
    assert response.status_code == 202, response.text
    results = response.json()["links"]["results"]
    _wait_finished(stack, response.json()["id"])

    as_csv = stack.get(results, params={"format": "csv"})
    as_jsonl = stack.get(results, params={"format": "jsonl"})

    assert as_csv.status_code == as_jsonl.status_code == 200
    assert_defused_results(as_csv.text, as_jsonl.text)


def test_cached_items_settle_when_the_batch_is_created(stack, sandbox):
    cep = sandbox.known("cep", seed=81)
    lookup = stack.post_lookup(cep).json()
    stack.wait_status(lookup["id"])
    served = sandbox.served("viacep")
    response = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": [cep, cep]}, timeout=10)
    assert response.status_code == 202
    body = response.json()
    assert body["total"] == 1 and body["duplicates"] == 1 and body["cached"] == 1
    assert body["counts"]["found"] == 1 and body["done"] == 1
    assert body["finished_at"] is not None and body["status"] == "complete"
    rows = _csv_rows(stack, body["id"])
    assert [row["state"] for row in rows] == ["found", "found"]
    assert rows[0]["municipio"]
    assert sandbox.served("viacep") == served  # nothing went upstream


def test_cancel_stops_the_items_not_started(stack, sandbox):
    sandbox.control("viacep", latency_ms=200)
    sandbox.control("brasilapi", latency_ms=200)
    ceps = sandbox.identifiers("cep", 400, seed=91)
    response = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10)
    batch_id = response.json()["id"]
    cancel = {"X-Cancel-Token": response.json()["cancel_token"]}
    wait_for(lambda: stack.get(f"/api/batches/{batch_id}").json()["done"] >= 5, 30, 0.05, "some items done")

    cancelled = requests.delete(f"{stack.web_url}/api/batches/{batch_id}", headers=cancel, timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    body = _wait_finished(stack, batch_id, 30)
    assert body["status"] == "cancelled"
    counts = body["counts"]
    assert counts["cancelled"] > 300, counts
    assert counts["pending"] == counts["running"] == 0
    started = counts["found"] + counts["not_found"] + counts["failed"] + counts["partial"]
    assert started + counts["cancelled"] == 400
    rows = _csv_rows(stack, batch_id)
    assert sum(row["state"] == "cancelled" for row in rows) == counts["cancelled"]
    assert all(not row["lookup_id"] for row in rows if row["state"] == "cancelled")
    # Only the items started before the cancel ever reached an upstream (each CEP calls each source once).
    assert sandbox.served("viacep") <= started
    again = requests.delete(f"{stack.web_url}/api/batches/{batch_id}", headers=cancel, timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_only_the_cancel_token_cancels_and_nothing_shows_it_again(stack, sandbox):
    sandbox.control("viacep", latency_ms=200)
    sandbox.control("brasilapi", latency_ms=200)
    ceps = sandbox.identifiers("cep", 200, seed=95)
    response = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10)
    assert response.status_code == 202
    batch_id, token = response.json()["id"], response.json()["cancel_token"]
    assert isinstance(token, str) and len(token) == 22 and token not in batch_id
    url = f"{stack.web_url}/api/batches/{batch_id}"

    refusals = [
        requests.delete(url, timeout=10),  # the shared link alone
        requests.delete(url, headers={"X-Cancel-Token": ""}, timeout=10),
        requests.delete(
            url, headers={"X-Cancel-Token": token[:-1] + ("A" if token[-1] != "A" else "B")}, timeout=10
        ),
        requests.delete(
            url, headers={"X-Cancel-Token": hashlib.sha256(token.encode()).hexdigest()}, timeout=10
        ),
    ]

    for refused in refusals:
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "forbidden" and "X-Cancel-Token" in refused.json()["message"]
    running = stack.get(f"/api/batches/{batch_id}").json()
    assert running["status"] == "running" and running["counts"]["cancelled"] == 0
    assert running["counts"]["pending"] > 0 and running["cancelled_at"] is None
    unknown = requests.delete(f"{url}x", headers={"X-Cancel-Token": token}, timeout=10)
    assert unknown.status_code == 404  # an unknown batch is still a 404, token or not
    # Redis keeps only the token's hash (a reader of Redis cannot cancel either).
    stored = services(stack.app).redis.hgetall(services(stack.app).batches.key(batch_id))
    assert stored[b"cancel_token_sha256"] == hashlib.sha256(token.encode()).hexdigest().encode()
    assert not any(token.encode() in value for value in stored.values())

    cancelled = requests.delete(url, headers={"X-Cancel-Token": token}, timeout=10)

    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["counts"]["cancelled"] > 0
    assert "cancel_token" not in cancelled.json()
    _wait_finished(stack, batch_id, 60)
    shown = [
        stack.get(f"/api/batches/{batch_id}").text,
        stack.get(f"/api/batches/{batch_id}/results", params={"format": "csv"}).text,
        stack.get(f"/api/batches/{batch_id}/results", params={"format": "jsonl"}).text,
        *(event.data for event in read_all(f"{url}/events", timeout=10) if isinstance(event, Event)),
    ]
    assert len(shown) > 4 and not [text for text in shown if token in text or "cancel_token" in text]


def test_batch_events_stream_progress_until_complete(stack, sandbox):
    ceps = sandbox.identifiers("cep", 40, seed=101)
    body = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": ceps}, timeout=10).json()
    events = [
        r for r in read_all(f"{stack.web_url}{body['links']['events']}", timeout=60) if isinstance(r, Event)
    ]
    types = [event.type for event in events]
    assert types[0] == "snapshot" and types[-1] == "complete"
    final = orjson.loads(events[-1].data)
    assert final["status"] == "complete" and final["done"] == 40
    progress = [orjson.loads(event.data)["done"] for event in events if event.type == "progress"]
    assert progress == sorted(progress)
    # A stream opened after the end gets the snapshot and `complete` at once.
    late = [
        r for r in read_all(f"{stack.web_url}{body['links']['events']}", timeout=10) if isinstance(r, Event)
    ]
    assert [event.type for event in late] == [
        "snapshot",
        *([] if len(late) == 2 else ["progress"] * (len(late) - 2)),
        "complete",
    ]


def test_bad_batches_are_refused_with_a_clear_error(stack):
    url = f"{stack.web_url}/api/batches"
    too_many = "\n".join(["11222333000181"] * 10_001)  # BATCH_MAX_ROWS: 10,000
    response = requests.post(url, data=too_many, headers={"Content-Type": "text/csv"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "invalid_batch"
    assert "10,000" in response.json()["message"]
    response = requests.post(url, data=b"\xff\xfe", headers={"Content-Type": "text/csv"}, timeout=10)
    assert response.status_code == 400 and "UTF-8" in response.json()["message"]
    response = requests.post(url, data="x", headers={"Content-Type": "application/xml"}, timeout=10)
    assert response.status_code == 415
    response = requests.post(url, json={"ids": []}, timeout=10)
    assert response.status_code == 400
    response = requests.post(url, json={"identifiers": []}, timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "invalid_batch"
    response = requests.post(url, files={"other": ("a.csv", b"1", "text/csv")}, timeout=10)
    assert response.status_code == 400 and response.json()["field"] == "file"
    for path in ("/api/batches/nope", "/api/batches/nope/results", "/api/batches/nope/events"):
        assert stack.get(path).status_code == 404
    assert requests.delete(f"{url}/nope", timeout=10).status_code == 404
    assert requests.delete(f"{url}/nope", headers={"X-Cancel-Token": "x"}, timeout=10).status_code == 404


def test_a_batch_of_only_invalid_rows_is_complete_at_once(stack):
    response = requests.post(
        f"{stack.web_url}/api/batches",
        json={"identifiers": ["123", {"identifier": "01310100", "type": "cpf"}, 42]},
        timeout=10,
    )
    assert response.status_code == 202
    body = response.json()
    assert [entry["line"] for entry in body["invalid"]] == [1, 2, 3]
    assert body["total"] == 0 and body["status"] == "complete"
    rows = _csv_rows(stack, body["id"])
    assert [row["state"] for row in rows] == ["invalid"] * 3
    assert stack.get(f"/api/batches/{body['id']}/results", params={"format": "xml"}).status_code == 400
