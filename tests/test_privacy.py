"""Privacy end to end (gunicorn, a Celery worker, Redis, the sandbox): what one client can learn of another.

- Single flight shares work, not identity: a request that joins another's lookup gets an id,
  priority, times and call ids of its own, everywhere (the 202, reads, events, /api/tasks, a
  batch's lookup_id column).
- A CPF is answered from the number alone: after CPF lookups (API and CLI) and a CPF batch, no
  key or value anywhere in Redis, and no log line, holds the number.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import orjson
import pytest
import requests
from conftest import FAST_LIMITS, ROOT, wait_for
from sandbox_fixture import generated_cnpjs, generated_cpfs
from sse_client import read_all

from enrich.services import services

SLOW_COMPANY_SOURCES = ("brasilapi", "receitaws", "opencnpj")


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    from stack import started

    env = {**FAST_LIMITS, "BATCH_POLL_INTERVAL": "0.05"}
    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("privacy"), **env) as stack:
        yield stack


def _leaks(text: str, first: dict) -> list[str]:
    """What of the first request's own (id, call ids) shows in `text`."""
    return [value for value in (first["id"], *first["tasks"].values()) if value in text]


def test_a_request_that_joins_a_lookup_sees_only_its_own_id_priority_times_and_calls(stack, sandbox):
    for name in SLOW_COMPANY_SOURCES:
        sandbox.control(name, latency_ms=700, quota_per_minute=None)
    cnpj = generated_cnpjs(1, seed=1401)[0]
    first = stack.post_lookup(cnpj, priority=2).json()

    joined_response = stack.post_lookup(cnpj, priority=9)

    assert joined_response.status_code == 202
    joined = joined_response.json()
    assert _leaks(joined_response.text, first) == []
    assert joined["id"] != first["id"] and joined["priority"] == 9
    assert joined["created_at"] > first["created_at"] and joined["deadline_at"] > first["deadline_at"]
    assert joined_response.headers["Location"] == f"/api/lookups/{joined['id']}"
    # Its events, read over HTTP while the shared work runs: every one of them its own.
    events = read_all(f"{stack.web_url}/api/lookups/{joined['id']}/events")
    texts = [event.data for event in events if hasattr(event, "data")]
    assert [_leaks(text, first) for text in texts] == [[]] * len(texts)
    complete = orjson.loads(texts[-1])
    assert (complete["id"], complete["priority"], complete["status"]) == (joined["id"], 9, "complete")
    assert complete["tasks"] == joined["tasks"] and complete["created_at"] == joined["created_at"]
    # Reads and its call ids.
    read = stack.get(f"/api/lookups/{joined['id']}")
    assert _leaks(read.text, first) == [] and read.json()["result"]["cnpj"] == cnpj
    for source, call_id in joined["tasks"].items():
        task = stack.get(f"/api/tasks/{call_id}")
        assert task.status_code == 200 and _leaks(task.text, first) == []
        assert (task.json()["lookup_id"], task.json()["source"], task.json()["state"]) == (
            joined["id"],
            source,
            "SUCCESS",
        )
    # The first request keeps its own view.
    assert stack.get(f"/api/lookups/{first['id']}").json()["priority"] == 2


def test_a_batch_item_that_joins_a_persons_lookup_shows_its_own_lookup_id(stack, sandbox):
    for name in SLOW_COMPANY_SOURCES:
        sandbox.control(name, latency_ms=1500, quota_per_minute=None)
    cnpj = generated_cnpjs(1, seed=1402)[0]
    person = stack.post_lookup(cnpj, priority=5).json()

    created = requests.post(f"{stack.web_url}/api/batches", json={"identifiers": [cnpj]}, timeout=10)

    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    wait_for(
        lambda: stack.get(f"/api/batches/{batch_id}").json()["finished_at"], 30, 0.1, "the batch to finish"
    )
    rows = stack.get(f"/api/batches/{batch_id}/results", params={"format": "jsonl"}).text
    row = orjson.loads(rows.splitlines()[0])
    assert row["state"] == "found" and row["lookup_id"] and row["lookup_id"] != person["id"]
    assert _leaks(rows, person) == []
    assert _leaks(stack.get(f"/api/lookups/{row['lookup_id']}").text, person) == []
    # It did join: one set of upstream calls for both.
    assert services(stack.app).lookups.get(row["lookup_id"]).work_id == person["id"]


def _redis_dump(client) -> str:
    """Every key and every value in the whole Redis database, as text."""
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        parts.append(key.decode(errors="replace"))
        if kind == "string":
            value = [client.get(key)]
        elif kind == "hash":
            value = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = list(client.smembers(key))
        elif kind == "zset":
            value = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            value = [item for _, fields in client.xrange(key) for pair in fields.items() for item in pair]
        else:
            value = []
        parts.extend((item or b"").decode(errors="replace") for item in value)
    return "\n".join(parts)


def _forms(cpf: str) -> list[str]:
    """The ways a CPF is written down: bare, and printed (whose first nine digits are checked alone,
    so a printed CPF with its check digits cut off is caught too)."""
    return [cpf, f"{cpf[:3]}.{cpf[3:6]}.{cpf[6:9]}-{cpf[9:]}", f"{cpf[:3]}.{cpf[3:6]}.{cpf[6:9]}"]


def test_no_cpf_is_ever_kept_in_redis_or_shown_in_a_log(stack, sandbox):
    cpfs = generated_cpfs(6, seed=1403)
    typo = cpfs[5][:10] + str((int(cpfs[5][10]) + 1) % 10)  # a wrong check digit: invalid, still personal
    served_before = sandbox.served("brasilapi")

    # Over the API, in both forms; twice, as a second person would ask.
    for cpf in cpfs[:2]:
        for form in (cpf, _forms(cpf)[1], cpf):
            response = stack.post_lookup(form)
            assert response.status_code == 200 and response.json()["cached"] is False
            assert response.json()["result"]["valido"] is True
    # From the command line.
    env = {**stack.env, "FLASK_APP": "app"}
    cli = subprocess.run(
        [sys.executable, "-m", "flask", "lookup", cpfs[2], "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert orjson.loads(cli.stdout)["result"]["regiao_fiscal"] == int(cpfs[2][8])
    # In a batch: valid CPFs, a duplicate, a typo, a CPF with a prefix, one digit short, one with a
    # leading zero, beside a CEP; and a CPF in the type column and in the batch's name.
    printed = _forms(cpfs[4])[1]
    rows = [
        cpfs[3],
        printed,
        cpfs[3],
        typo,
        f"CPF: {_forms(cpfs[5])[1]}",
        printed[:-1],
        "0" + cpfs[5],
        "01310-100",
    ]
    created = requests.post(
        f"{stack.web_url}/api/batches", data="\n".join(rows), headers={"Content-Type": "text/csv"}, timeout=10
    )
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    wait_for(lambda: stack.get(f"/api/batches/{batch_id}").json()["finished_at"], 30, 0.1, "the batch")
    jsonl = stack.get(f"/api/batches/{batch_id}/results", params={"format": "jsonl"}).text
    results = [orjson.loads(line) for line in jsonl.splitlines()]
    states = ["found", "found", "found", "invalid", "invalid", "invalid", "invalid", "found"]
    assert [row["state"] for row in results] == states
    assert results[0]["fields"] == {"valido": True, "regiao_fiscal": int(cpfs[3][8])}
    assert results[0]["input"] == f"*********{cpfs[3][9:]}"
    assert results[0]["identifier"] == f"***.***.***-{cpfs[3][9:]}"
    assert results[1]["input"] == f"***.***.***-{cpfs[4][9:]}"
    assert results[4]["input"] == f"CPF: ***.***.***-{cpfs[5][9:]}"
    other = {"identifiers": [{"identifier": "01310100", "type": _forms(cpfs[0])[1]}], "name": printed}
    created = requests.post(f"{stack.web_url}/api/batches", json=other, timeout=10)
    assert created.status_code == 202, created.text
    assert printed not in stack.get(f"/api/batches/{created.json()['id']}").text
    wait_for(lambda: stack.get(f"/api/batches/{created.json()['id']}").json()["finished_at"], 30, 0.1, "it")

    assert sandbox.served("brasilapi") == served_before + 1  # the CEP's call; never a CPF
    everything = _redis_dump(services(stack.app).redis)
    logs = stack.log("web") + stack.log("w1")
    for cpf in [*cpfs, typo]:
        for form in _forms(cpf):
            assert form not in everything, f"{form} is in Redis"
            assert form not in logs, f"{form} is in a log"


def test_the_cli_shows_a_cpf_masked(stack):
    env = {**stack.env, "FLASK_APP": "app"}
    cpf = generated_cpfs(1, seed=1404)[0]
    done = subprocess.run(
        [sys.executable, "-m", "flask", "lookup", cpf],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [form for form in _forms(cpf) if form in done.stdout] == []
    assert f"{cpf[:3]}******{cpf[9:]}" in done.stdout
    assert "regiao_fiscal" in done.stdout


def test_cleanup_purges_the_cpfs_an_earlier_version_cached_and_recorded(app, redis_client, settings):
    from enrich import maintenance
    from enrich.lookups import Lookup, LookupStatus, SourceResult, SourceState

    cpf, cep = generated_cpfs(1, seed=1405)[0], "01310100"
    store, cache = services(app).lookups, services(app).cache
    with app.app_context():
        # What the earlier version left: a cache entry, a running lookup (record, lock, task id,
        # event log) and one answered from the cache; and a CEP's, which must stay.
        old_entry = cache._entry_key(cache.generation(), "cpf", "brasilapi", cpf)  # noqa: SLF001 (as written then)
        redis_client.set(old_entry, orjson.dumps({"data": {"cpf": cpf}}), ex=3600)
        cache.set("cep", "viacep", cep, {"cep": cep}, found=True)
        for kind, value in (("cpf", cpf), ("cep", cep)):
            lookup = Lookup(
                id=f"old-{kind}",
                type=kind,
                identifier=value,
                priority=5,
                status=LookupStatus.RUNNING,
                created_at=time.time(),
                deadline_at=time.time() + 15,
                sources={"brasilapi": SourceResult("brasilapi", SourceState.PENDING)},
                tasks={"brasilapi": f"task-{kind}"},
            )
            store.create(lookup, claim=True)
            services(app).events.publish(lookup.id, "source", {"identifier": value})
        answered = dataclasses.replace(lookup, id="old-answer", type="cpf", identifier=cpf, tasks={})
        answered.status = LookupStatus.COMPLETE
        store.create_answered(answered)
        assert cpf in _redis_dump(redis_client)

        report = maintenance.cleanup(services())

    assert report["removed"]["cpf_leftovers"] >= 4, report
    everything = _redis_dump(redis_client)
    assert [form for form in _forms(cpf) if form in everything] == []
    assert store.get("old-cep") is not None and cache.get_many("cep", ["viacep"], cep)


def test_a_cpf_batch_runs_from_the_cli_without_a_worker_and_shows_no_whole_cpf(make_stack, tmp_path):
    stack = make_stack()  # no worker: CPFs need none
    cpf = generated_cpfs(1, seed=1406)[0]
    path = tmp_path / "pessoas.csv"
    path.write_text(f"{cpf}\nCPF {_forms(cpf)[1][:-1]}\n")
    env = {**stack.env, "FLASK_APP": "app"}

    done = subprocess.run(
        [sys.executable, "-m", "flask", "batch", "run", str(path), "--format", "jsonl"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [row["state"] for row in rows] == ["found", "invalid"]
    assert rows[0]["fields"]["valido"] is True
    shown = done.stdout + done.stderr
    assert [form for form in _forms(cpf) if form in shown] == []
    assert f"CPF ***.***.**{cpf[8]}-{cpf[9]}" in done.stderr  # the unreadable line, masked there too
