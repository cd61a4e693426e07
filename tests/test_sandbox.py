"""The sandbox upstream over real HTTP: paths and shapes, deterministic data, faults, quotas, stats, control."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests

from devstack import sandbox as sandbox_module
from devstack import sandbox_bodies
from devstack.embedded_redis import free_port
from devstack.sandbox import FIELD_CHECKS, FaultConfig, SandboxState, create_app, is_known
from enrich.identifiers import Identifier, IdentifierType
from enrich.settings import SOURCE_NAMES, UPSTREAM_QUOTA_PER_MINUTE, Settings
from enrich.sources import build_sources

pytest_plugins = ["sandbox_fixture"]  # the sandbox and sandbox_url fixtures

DATA = Path(__file__).parent / "data" / "upstream"
KNOWN_CNPJS = ("11222333000181", "12ABC34501DE35", "27865757000102", "19131243000197")
KNOWN_CEPS = ("01310100", "22460901")
KNOWN_CPF = "11144477735"


def reference(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def folded(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()


def normalized(sandbox, kind: str, value: str) -> dict[str, dict]:
    """Every sandbox upstream's answer for one identifier, through the real adapters."""
    port = int(sandbox.url.rsplit(":", 1)[1])
    sources = build_sources(Settings.from_env({}, sandbox_port=port))
    identifier = Identifier(IdentifierType(kind), value)
    return {
        name: source.fetch(identifier)
        for name, source in sources.items()
        if kind in source.types and source.supports(identifier)
    }


# ---------------------------------------------------------------------------------------------------------
# Paths and body shapes


@pytest.mark.parametrize(
    ("path", "reference_file"),
    [
        ("/brasilapi/api/cnpj/v1/19131243000197", "brasilapi_cnpj_v1_200.json"),
        ("/brasilapi/api/cep/v2/01310100", "brasilapi_cep_v2_200.json"),
        ("/receitaws/v1/cnpj/27865757000102", "receitaws_200.json"),
        ("/viacep/ws/22460901/json/", "viacep_200.json"),
    ],
)
def test_each_upstream_answers_with_every_key_of_the_real_body(sandbox, path, reference_file):
    response = sandbox.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()) == set(reference(reference_file))


def test_opencnpj_answers_with_the_real_field_names(sandbox):
    response = sandbox.get("/opencnpj/12ABC34501DE35")
    assert response.status_code == 200
    answer = response.json()
    assert set(reference("opencnpj_200_min.json")) <= set(answer)
    assert {"telefones", "QSA", "capital_social", "cnaes_secundarios"} <= set(answer)
    assert answer["cnpj"] == "12ABC34501DE35"


def test_receitaws_body_uses_its_own_formats(sandbox):
    answer = sandbox.get("/receitaws/v1/cnpj/11222333000181").json()
    assert answer["status"] == "OK"
    assert answer["cnpj"] == "11.222.333/0001-81"
    assert len(answer["abertura"]) == 10 and answer["abertura"][2] == "/"
    assert isinstance(answer["capital_social"], str)
    assert answer["cep"][2] == "." and answer["cep"][6] == "-"


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("/brasilapi/api/cnpj/v1/11222333000180", 400, {"type": "bad_request", "name": "BadRequestError"}),
        ("/brasilapi/api/cep/v2/123", 400, {"type": "validation_error", "name": "CepPromiseError"}),
        ("/receitaws/v1/cnpj/12ABC34501DE35", 200, {"status": "ERROR", "message": "CNPJ inválido"}),
        ("/opencnpj/123", 400, {"error": "invalid cnpj"}),
        ("/brasilapi/api/banks/v1/1", 404, {"type": "not_found", "message": "Page not found."}),
    ],
)
def test_invalid_identifiers_get_each_upstreams_error_form(sandbox, path, status, expected):
    response = sandbox.get(path)
    assert response.status_code == status
    assert expected.items() <= response.json().items()


def test_viacep_answers_a_malformed_cep_with_an_html_400(sandbox):
    response = sandbox.get("/viacep/ws/123/json/")
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/html")


def test_not_found_identifiers_get_each_upstreams_not_found_form(sandbox):
    cnpj, cep = sandbox.unknown("cnpj"), sandbox.unknown("cep")
    response = sandbox.get(f"/brasilapi/api/cnpj/v1/{cnpj}")
    assert response.status_code == 404 and response.json()["type"] == "not_found"
    response = sandbox.get(f"/brasilapi/api/cep/v2/{cep}")
    assert response.status_code == 404 and response.json()["type"] == "service_error"
    response = sandbox.get(f"/receitaws/v1/cnpj/{cnpj}")
    assert response.status_code == 200 and response.json()["status"] == "ERROR"
    response = sandbox.get(f"/opencnpj/{cnpj}")
    assert response.status_code == 404 and response.json() == {"error": "not found"}
    response = sandbox.get(f"/viacep/ws/{cep}/json/")
    assert response.status_code == 200 and response.json()["erro"] in (True, "true")


def test_viacep_uses_both_not_found_forms(sandbox):
    forms = {json.dumps(sandbox_bodies.viacep_not_found(cep)) for cep in sandbox.identifiers("cep", 50)}
    assert forms == {'{"erro": true}', '{"erro": "true"}'}


def test_healthz(sandbox):
    response = sandbox.get("/healthz")
    assert response.status_code == 200 and response.text == "ok"


# ---------------------------------------------------------------------------------------------------------
# Deterministic data


def test_the_same_identifier_always_gets_the_same_body(sandbox):
    for path in (
        "/brasilapi/api/cnpj/v1/11222333000181",
        "/opencnpj/12ABC34501DE35",
        "/viacep/ws/01310100/json/",
    ):
        assert sandbox.get(path).content == sandbox.get(path).content


def test_the_three_cnpj_upstreams_describe_the_same_company(sandbox):
    sandbox.control("receitaws", quota_per_minute=None)
    for cnpj in [*KNOWN_CNPJS, *sandbox.identifiers("cnpj", 8, seed=3)]:
        if not is_known(cnpj):
            continue
        answers = normalized(sandbox, "cnpj", cnpj)
        assert set(answers) == (
            {"brasilapi", "receitaws", "opencnpj"} if cnpj.isdigit() else {"brasilapi", "opencnpj"}
        )
        first, *others = answers.values()
        for other in others:
            for key in (
                "razao_social",
                "situacao_cadastral",
                "data_abertura",
                "data_situacao_cadastral",
                "endereco",
            ):
                assert other[key] == first[key], (cnpj, key)
            assert other["capital_social"] == pytest.approx(first["capital_social"])
            assert other["cnae_principal"]["codigo"] == first["cnae_principal"]["codigo"]


def test_company_cep_is_known_to_the_cep_upstreams_with_the_same_city(sandbox):
    sandbox.control("receitaws", quota_per_minute=None)
    for cnpj in [*KNOWN_CNPJS, *sandbox.identifiers("cnpj", 10, seed=4)]:
        if not is_known(cnpj):
            continue
        address = normalized(sandbox, "cnpj", cnpj)["brasilapi"]["endereco"]
        places = normalized(sandbox, "cep", address["cep"])
        assert set(places) == {"brasilapi", "viacep"}
        for place in places.values():
            assert folded(place["municipio"]) == folded(address["municipio"])
            assert place["uf"] == address["uf"]
            assert folded(place["logradouro"]) == folded(address["logradouro"])


def test_cep_city_comes_from_the_real_cep_range(sandbox):
    assert sandbox.get("/viacep/ws/01310100/json/").json()["localidade"] == "São Paulo"
    rio = sandbox.get("/brasilapi/api/cep/v2/22460901").json()
    assert (rio["city"], rio["state"], rio["street"]) == ("Rio de Janeiro", "RJ", "Rua Lopes Quintas")


def test_the_sandbox_has_no_cpf_route(sandbox):
    # The service never sends a CPF anywhere (cpf_answers.py), so its stand-in upstream takes none.
    response = sandbox.get(f"/brasilapi/api/cpf/v1/{KNOWN_CPF}")
    assert response.status_code == 404 and response.json()["type"] == "not_found"


def test_documented_identifiers_are_always_found(sandbox):
    for cnpj in KNOWN_CNPJS:
        assert sandbox.get(f"/brasilapi/api/cnpj/v1/{cnpj}").status_code == 200
        assert sandbox.get(f"/opencnpj/{cnpj}").status_code == 200
    for cep in KNOWN_CEPS:
        assert sandbox.get(f"/brasilapi/api/cep/v2/{cep}").status_code == 200
        assert "erro" not in sandbox.get(f"/viacep/ws/{cep}/json/").json()
    for cnpj in KNOWN_CNPJS[::2]:  # receitaws allows 3 a minute; the alphanumeric one it cannot serve
        if cnpj.isdigit():
            assert sandbox.get(f"/receitaws/v1/cnpj/{cnpj}").json()["status"] == "OK"


def test_about_one_in_ten_valid_identifiers_is_not_found(sandbox):
    cnpjs = sandbox.identifiers("cnpj", 200, seed=11)
    statuses = [sandbox.get(f"/brasilapi/api/cnpj/v1/{cnpj}").status_code for cnpj in cnpjs]
    assert set(statuses) == {200, 404}
    assert [status == 200 for status in statuses] == [is_known(cnpj) for cnpj in cnpjs]
    assert 10 <= statuses.count(404) <= 32  # 10% of 200, give or take two standard deviations and change
    for kind in ("cep",):
        missing = sum(not is_known(value) for value in sandbox.identifiers(kind, 200, seed=12))
        assert 10 <= missing <= 32, kind


# ---------------------------------------------------------------------------------------------------------
# Faults


def test_latency_delays_the_answer(sandbox):
    sandbox.control("brasilapi", latency_ms=400)
    started = time.monotonic()
    assert sandbox.get("/brasilapi/api/cep/v2/01310100").status_code == 200
    assert time.monotonic() - started >= 0.4


def test_latency_with_jitter_stays_within_its_bounds(sandbox):
    sandbox.control("viacep", latency_ms=300, jitter_ms=100)
    started = time.monotonic()
    assert sandbox.get("/viacep/ws/01310100/json/").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_delayed_requests_wait_concurrently_in_the_single_gevent_worker(sandbox):
    sandbox.control("opencnpj", latency_ms=500)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: sandbox.get("/opencnpj/11222333000181").status_code, range(8)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 8
    assert 0.5 <= elapsed < 2.0  # one after another would take 4 s


def test_error_rate_one_fails_every_request_with_a_5xx(sandbox):
    sandbox.control("brasilapi", error_rate=1.0)
    sandbox.control("viacep", error_rate=1.0)
    for _ in range(5):
        response = sandbox.get("/brasilapi/api/cnpj/v1/11222333000181")
        assert response.status_code == 500 and response.json()["type"] == "internal_error"
        assert sandbox.get("/viacep/ws/01310100/json/").status_code == 500
    assert sandbox.get("/opencnpj/11222333000181").status_code == 200  # faults are per upstream


def test_outage_answers_503_at_once(sandbox):
    sandbox.control("opencnpj", outage=True, latency_ms=5000)
    started = time.monotonic()
    assert [sandbox.get("/opencnpj/11222333000181").status_code for _ in range(3)] == [503] * 3
    assert time.monotonic() - started < 2.0
    assert sandbox.stats()["upstreams"]["opencnpj"]["by_status"] == {"503": 3}


def test_quota_answers_429_with_retry_after_past_the_limit(sandbox):
    assert UPSTREAM_QUOTA_PER_MINUTE["receitaws"] == 3
    statuses = [sandbox.get("/receitaws/v1/cnpj/11222333000181") for _ in range(4)]
    assert [response.status_code for response in statuses] == [200, 200, 200, 429]
    refused = statuses[-1]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert set(refused.json()) == set(reference("cnpjws_429.json"))
    assert "3 consultas por minuto" in refused.json()["detalhes"]


def test_quota_can_be_changed_and_removed_at_run_time(sandbox):
    sandbox.control("brasilapi", quota_per_minute=2)
    path = "/brasilapi/api/cep/v2/01310100"
    assert [sandbox.get(path).status_code for _ in range(3)] == [200, 200, 429]
    sandbox.control("brasilapi", quota_per_minute=None)
    assert sandbox.get(path).status_code == 200


def test_busiest_second_and_minute_count_arrivals_in_sliding_windows():
    state = SandboxState({"opencnpj": FaultConfig()})
    # Recorded out of order (requests handled concurrently): each counts at its arrival time.
    for moment in (0.0, 0.3, 1.2, 0.9, 1.28, 1.25, 30.0, 61.5):
        state.admit("opencnpj", arrived=1000.0 + moment)
    counted = state.stats()["upstreams"]["opencnpj"]
    # 0.3, 0.9, 1.2, 1.25, 1.28 lie within one second; the first seven within one minute.
    assert (counted["busiest_second"], counted["busiest_minute"]) == (5, 7)
    assert counted["kernel_stamped"] == 8


def test_the_busiest_windows_are_recounted_when_a_late_recorded_arrival_fills_an_old_one():
    state = SandboxState({"opencnpj": FaultConfig()})
    for moment in (0.0, 0.5, 5.0):
        state.admit("opencnpj", arrived=2000.0 + moment)
    assert state.stats()["upstreams"]["opencnpj"]["busiest_second"] == 2
    state.admit("opencnpj", arrived=2000.7)  # recorded after 5.0, arrived before it
    assert state.stats()["upstreams"]["opencnpj"]["busiest_second"] == 3


def test_arrivals_list_both_times_of_each_request_and_the_probe_keeps_its_tags():
    state = SandboxState({"opencnpj": FaultConfig()})
    state.admit("opencnpj", arrived=3000.0)
    state.admit("opencnpj")  # no kernel stamp: counted when handled
    state.probe(7, arrived=3001.0)
    requests = state.arrivals("opencnpj")["requests"]
    assert requests[0][0] == 3000.0 and requests[0][1] > 3000.0 and requests[0][2] is None
    assert requests[1][0] == requests[1][1]
    assert state.arrivals("opencnpj")["kernel_stamped"] == 1
    assert [(arrived, tag) for arrived, _, tag in state.arrivals("_probe")["requests"]] == [(3001.0, 7)]


def test_quota_window_slides_and_retry_after_counts_down_to_the_oldest_request(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(sandbox_module.time, "monotonic", lambda: clock[0])
    state = SandboxState({"receitaws": FaultConfig(quota_per_minute=2)})
    assert state.admit("receitaws").retry_after is None
    clock[0] += 10
    assert state.admit("receitaws").retry_after is None
    clock[0] += 5
    assert state.admit("receitaws").retry_after == 45  # the first request leaves the window at 1060
    clock[0] = 1060.5
    assert state.admit("receitaws").retry_after is None  # refused requests did not take a slot
    assert state.admit("receitaws").retry_after == 10


# ---------------------------------------------------------------------------------------------------------
# Stats and control


@pytest.fixture
def own_sandbox(tmp_path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A sandbox of this test's own under the stamping worker: (its URL, its process, in a process
    group of its own with its gunicorn worker, to stop at will)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "gunicorn", "-k", "devstack.sandbox_worker.StampingGeventWorker", "-w", "1",
        "-b", f"127.0.0.1:{port}", "--no-control-socket", "devstack.sandbox:create_app()",
    ]  # fmt: skip
    with (tmp_path / "sandbox.log").open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/healthz"):
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "sandbox.log"
            ).read_text()
            time.sleep(0.05)
        yield url, process
    finally:
        os.killpg(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(10)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _read_answer(connection: socket.socket) -> bytes:
    """One HTTP answer off a keep-alive connection (headers, then Content-Length bytes)."""
    reader = connection.makefile("rb")
    status = reader.readline()
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    reader.read(length)
    return status


def test_a_stalled_sandbox_counts_each_request_when_it_arrived_not_when_it_got_round_to_it(own_sandbox):
    """The instrument: requests sent evenly 50 ms apart while the sandbox cannot run (SIGSTOP, as
    a starved process) are handled in a bunch once it runs again, but counted at their arrival."""
    url, process = own_sandbox
    host, port = url.rsplit("//", 1)[1].split(":")
    connections = [socket.create_connection((host, int(port)), timeout=10) for _ in range(10)]
    sent: list[tuple[float, float]] = []
    os.killpg(process.pid, signal.SIGSTOP)  # gunicorn's master and its worker
    try:
        start = time.time() + 0.05
        for number, connection in enumerate(connections):
            while (late := start + number * 0.05 - time.time()) > 0:
                time.sleep(late)  # the schedule's own pace, not a wait for the sandbox
            before = time.time()
            connection.sendall(f"GET /_probe/{number} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            sent.append((before, time.time()))
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    assert all(_read_answer(connection).startswith(b"HTTP/1.1 200") for connection in connections)
    for connection in connections:
        connection.close()
    probe = sorted(requests.get(f"{url}/_arrivals/_probe", timeout=5).json()["requests"], key=lambda r: r[2])
    assert [tag for _, _, tag in probe] == list(range(10))
    arrived, handled = [r[0] for r in probe], [r[1] for r in probe]
    # Each kernel stamp lies within its own send call; the handler's times all come after the stall.
    for (before, after), stamp in zip(sent, arrived, strict=True):
        assert before - 0.001 <= stamp <= after + 0.001
    assert min(handled) > sent[-1][1]
    assert max(handled) - min(handled) < 0.2 < 0.4 < arrived[-1] - arrived[0]


def test_stats_count_every_request_by_upstream_and_status(sandbox):
    idle = {"requests": 0, "by_status": {}, "busiest_second": 0, "busiest_minute": 0, "kernel_stamped": 0}
    assert sandbox.stats() == {"upstreams": {name: idle for name in SOURCE_NAMES}}
    sandbox.get("/brasilapi/api/cnpj/v1/11222333000181")
    sandbox.get("/brasilapi/api/cnpj/v1/11222333000180")
    sandbox.get("/brasilapi/api/nothing/here")
    sandbox.control("viacep", outage=True)
    sandbox.get("/viacep/ws/01310100/json/")
    sandbox.get("/healthz")
    upstreams = sandbox.stats()["upstreams"]
    assert upstreams["brasilapi"]["requests"] == 3
    assert upstreams["brasilapi"]["by_status"] == {"200": 1, "400": 1, "404": 1}
    assert upstreams["viacep"]["requests"] == upstreams["viacep"]["busiest_minute"] == 1
    assert upstreams["viacep"]["by_status"] == {"503": 1}
    assert upstreams["receitaws"]["requests"] == upstreams["opencnpj"]["requests"] == 0


def test_reset_zeroes_counts_and_restores_default_faults(sandbox):
    defaults = sandbox.get("/_control").json()
    sandbox.control("brasilapi", outage=True, latency_ms=10)
    for _ in range(3):
        sandbox.get("/receitaws/v1/cnpj/11222333000181")
    assert sandbox.get("/receitaws/v1/cnpj/11222333000181").status_code == 429
    sandbox.reset()
    assert sandbox.get("/_control").json() == defaults
    assert sandbox.served("receitaws") == sandbox.served("brasilapi") == 0
    assert sandbox.get("/receitaws/v1/cnpj/11222333000181").status_code == 200  # the quota window emptied
    assert sandbox.get("/brasilapi/api/cep/v2/01310100").status_code == 200


def test_control_answers_with_the_new_faults(sandbox):
    answer = sandbox.control("viacep", latency_ms=25, error_rate=0.5)
    assert answer["upstreams"]["viacep"] == {
        "latency_ms": 25,
        "jitter_ms": 0.0,
        "error_rate": 0.5,
        "outage": False,
        "quota_per_minute": UPSTREAM_QUOTA_PER_MINUTE["viacep"],
        "override": None,
        "body": None,
    }
    assert set(FIELD_CHECKS) == set(FaultConfig().to_dict())  # every fault field is validated


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"upstream": "cnpjws", "outage": True}, "unknown upstream 'cnpjws'"),
        ({"outage": True}, "unknown upstream None"),
        ({"upstream": "brasilapi", "latency_ms": "100"}, "latency_ms must be a number"),
        ({"upstream": "brasilapi", "latency_ms": -1}, "latency_ms must be a number"),
        ({"upstream": "brasilapi", "error_rate": 1.5}, "error_rate must be a number from 0 to 1"),
        ({"upstream": "brasilapi", "outage": "yes"}, "outage must be true or false"),
        ({"upstream": "brasilapi", "quota_per_minute": 2.5}, "quota_per_minute must be a whole number"),
        ({"upstream": "brasilapi", "quota_per_minute": True}, "quota_per_minute must be a whole number"),
        ({"upstream": "brasilapi", "colour": "red"}, "unknown fault field 'colour'"),
        ({"upstream": "brasilapi", "override": ["razao_social"]}, "override must be null or an object"),
        ({"upstream": "brasilapi", "override": {"razao_social": {"nested": 1}}}, "override must be null"),
        ({"upstream": "brasilapi", "override": {"": "x"}}, "override must be null"),
        ({"upstream": "brasilapi", "body": "garbage"}, "body must be null or one of invalid_json"),
        ({"reset": "yes"}, "reset must be true or false"),
        ({}, "nothing to do"),
        ([1, 2], "body must be a JSON object"),
    ],
)
def test_control_rejects_a_bad_body_with_400_and_changes_nothing(sandbox, payload, words):
    before = sandbox.get("/_control").json()
    response = sandbox.session.post(f"{sandbox.url}/_control", json=payload, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_control" and words in response.json()["message"]
    assert sandbox.get("/_control").json() == before


def test_control_rejects_a_body_that_is_not_json(sandbox):
    response = sandbox.session.post(f"{sandbox.url}/_control", data=b"outage please", timeout=5)
    assert response.status_code == 400 and "JSON object" in response.json()["message"]


def test_a_bad_field_leaves_the_valid_ones_unapplied(sandbox):
    payload = {"upstream": "brasilapi", "outage": True, "latency_ms": "slow"}
    assert sandbox.session.post(f"{sandbox.url}/_control", json=payload, timeout=5).status_code == 400
    assert sandbox.get("/brasilapi/api/cep/v2/01310100").status_code == 200


def test_default_faults_come_from_the_environment():
    app = create_app(
        {"SANDBOX_QUOTA_RECEITAWS": "5", "SANDBOX_QUOTA_VIACEP": "none", "SANDBOX_LATENCY_MS": "7"}
    )
    faults = app.test_client().get("/_control").get_json()["upstreams"]
    assert faults["receitaws"]["quota_per_minute"] == 5
    assert faults["viacep"]["quota_per_minute"] is None
    assert faults["brasilapi"]["quota_per_minute"] == UPSTREAM_QUOTA_PER_MINUTE["brasilapi"]
    assert {fault["latency_ms"] for fault in faults.values()} == {7.0}
    with pytest.raises(ValueError, match="SANDBOX_QUOTA_OPENCNPJ"):
        create_app({"SANDBOX_QUOTA_OPENCNPJ": "lots"})
    with pytest.raises(ValueError, match="SANDBOX_LATENCY_MS"):
        create_app({"SANDBOX_LATENCY_MS": "-5"})


def test_override_replaces_fields_of_successful_json_answers_only(sandbox):
    hostile = "<img src=x onerror=alert(1)>"
    cnpj, missing = sandbox.known("cnpj"), sandbox.unknown("cnpj")
    sandbox.control("brasilapi", override={"razao_social": hostile, "capital_social": None})
    body = sandbox.get(f"/brasilapi/api/cnpj/v1/{cnpj}").json()
    assert body["razao_social"] == hostile and body["capital_social"] is None
    assert body["cnpj"] == cnpj  # the other fields are the upstream's own
    assert sandbox.get(f"/brasilapi/api/cnpj/v1/{missing}").status_code == 404  # errors untouched
    assert "razao_social" not in sandbox.get(f"/brasilapi/api/cnpj/v1/{missing}").json()
    assert sandbox.get(f"/opencnpj/{cnpj}").json().get("razao_social") != hostile  # one upstream only
    sandbox.control("brasilapi", override=None)
    assert sandbox.get(f"/brasilapi/api/cnpj/v1/{cnpj}").json()["razao_social"] != hostile


@pytest.mark.parametrize("kind", ["invalid_json", "html_error", "truncated", "wrong_types", "huge", "empty"])
def test_body_faults_answer_200_with_garbage(sandbox, kind):
    cnpj = sandbox.known("cnpj", seed=2)
    sandbox.control("opencnpj", body=kind)
    with sandbox.session.get(f"{sandbox.url}/opencnpj/{cnpj}", stream=True, timeout=30) as response:
        assert response.status_code == 200
        if kind == "truncated":
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                response.content  # noqa: B018 - reading it is the test
            return
        body = response.content
    if kind == "invalid_json":
        with pytest.raises(ValueError):
            orjson.loads(body)
    elif kind == "html_error":
        assert body.startswith(b"<html>") and response.headers["Content-Type"].startswith("text/html")
    elif kind == "wrong_types":
        data = orjson.loads(body)
        assert isinstance(data["razao_social"], int) and data
    elif kind == "huge":
        assert len(body) > 20 * 1024 * 1024 - 100_000
    else:
        assert body == b""
    sandbox.control("opencnpj", body=None)
    assert sandbox.get(f"/opencnpj/{cnpj}").json()["cnpj"]
