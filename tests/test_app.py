"""The HTTP contract (docs/architecture.md, "The HTTP contract"), in-process: Flask's test client against the session Redis.

No Celery worker runs here: a 202 leaves its tasks on the broker under the test's key prefix,
which is enough to check what was enqueued.  Every response goes through `ContractClient`,
which fails the test on any 500 or on a JSON body that carries a raw `<script`.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import time

import orjson
import pytest
from flask.testing import FlaskClient

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich import maintenance
from enrich.identifiers import cnpj_check_digits
from enrich.services import services
from enrich.settings import Settings
from enrich.sources import sources_for

ADMIN_TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

CNPJ = "11222333000181"
CNPJ_MASKED = "11.222.333/0001-81"
OTHER_CNPJ = "11444777000161"
ALPHANUMERIC_BASE = "12ABC34501DE"
ALPHANUMERIC_CNPJ = ALPHANUMERIC_BASE + cnpj_check_digits(ALPHANUMERIC_BASE)
CPF = "11144477735"
CEP = "01310100"
OTHER_CEP = "20040002"

COMPANY = {
    "cnpj": CNPJ,
    "razao_social": "ACME COMERCIO LTDA",
    "situacao_cadastral": "ATIVA",
    "endereco": {"cep": CEP, "municipio": "São Paulo", "uf": "SP"},
}
PLACE = {"cep": CEP, "municipio": "São Paulo", "uf": "SP"}
ADMIN_ENDPOINTS = [
    ("POST", "/api/admin/cache/invalidate"),
    ("POST", "/api/admin/breakers/receitaws/reset"),
    ("POST", "/api/admin/breakers/receitaws/open"),
    ("GET", "/api/admin/dead-letters"),
    ("POST", "/api/admin/dead-letters/0123456789abcdef/requeue"),
]


class ContractClient(FlaskClient):
    """A test client that fails on any 500 and on any JSON body echoing `<script` unescaped."""

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        assert response.status_code != 500, f"500 from the API: {response.get_data(as_text=True)}"
        if response.mimetype == "application/json":
            assert b"<script" not in response.get_data().lower(), response.get_data(as_text=True)
        return response


def _build(settings: Settings):
    app = create_app(settings)
    app.test_client_class = ContractClient
    return app


@pytest.fixture
def app(settings, redis_client):
    """The app on the test Redis with an admin token; `redis_client` deletes its keys afterwards."""
    app = _build(dataclasses.replace(settings, admin_token=ADMIN_TOKEN))
    yield app
    close_app(app)


@pytest.fixture
def client(app) -> FlaskClient:
    return app.test_client()


def post_lookup(client: FlaskClient, identifier: object = CNPJ, **fields: object):
    return client.post("/api/lookups", json={"identifier": identifier, **fields})


def fill_cache(app, kind: str, value: str, data: dict) -> None:
    """Cache an answer of every source of `kind` for `value`."""
    cache = services(app).cache
    for source in sources_for(kind, services(app).sources):
        cache.set(kind, source.name, value, data)


def cache_company(app, cnpj: str = CNPJ) -> None:
    """A cached company and its CEP, so the cross-checks need no upstream call."""
    fill_cache(app, "cnpj", cnpj, {**COMPANY, "cnpj": cnpj})
    fill_cache(app, "cep", CEP, PLACE)


def queued_messages(app) -> dict[str, int]:
    with app.app_context():
        return maintenance.queue_depths(services())


def assert_error(response, status: int, error: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == error
    assert isinstance(body["message"], str) and body["message"]
    if field is not None:
        assert body["field"] == field
    return body


# -- POST /api/lookups: accepted, cached, single flight -----------------------------------------


def test_uncached_cnpj_is_queued_as_one_task_with_a_call_id_per_source_and_links(app, client):
    response = post_lookup(client, CNPJ_MASKED)

    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued"
    assert body["type"] == "cnpj"
    assert body["identifier"] == CNPJ
    assert body["cached"] is False
    expected_sources = {s.name for s in sources_for("cnpj", services(app).sources)}
    assert set(body["tasks"]) == expected_sources == {"brasilapi", "receitaws", "opencnpj"}
    assert len(set(body["tasks"].values())) == len(expected_sources)
    assert body["links"] == {
        "self": f"/api/lookups/{body['id']}",
        "events": f"/api/lookups/{body['id']}/events",
    }
    assert response.headers["Location"] == f"/api/lookups/{body['id']}"
    assert sum(queued_messages(app).values()) == 1  # one task calls the three sources at once


def test_lookup_id_has_at_least_128_bits_and_differs_per_lookup(client):
    ids = [post_lookup(client, value).get_json()["id"] for value in (CNPJ, OTHER_CNPJ, CEP)]

    for lookup_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", lookup_id), lookup_id
    assert len(set(ids)) == len(ids)


def test_fully_cached_cnpj_answers_200_complete_with_result_and_checks(app, client):
    cache_company(app)

    response = post_lookup(client)

    assert response.status_code == 200
    body = response.get_json()
    assert body["cached"] is True
    assert body["status"] == "complete"
    assert body["identifier"] == CNPJ
    assert body["result"]["razao_social"] == COMPANY["razao_social"]
    checks = {check["name"]: check["status"] for check in body["checks"]}
    assert checks["active"] == "pass"
    assert checks["cep_matches_city"] == "pass"
    assert {r["state"] for r in body["sources"].values()} == {"ok"}
    assert body["links"]["self"] == f"/api/lookups/{body['id']}"
    assert sum(queued_messages(app).values()) == 0


def test_partly_cached_cnpj_enqueues_only_the_missing_sources(app, client):
    services(app).cache.set("cnpj", "brasilapi", CNPJ, COMPANY)

    body = post_lookup(client).get_json()

    assert set(body["tasks"]) == {"receitaws", "opencnpj"}
    assert body["sources"]["brasilapi"]["state"] == "ok"
    assert body["sources"]["brasilapi"]["cached"] is True


def test_second_post_for_same_uncached_identifier_joins_the_work_under_an_id_of_its_own(app, client):
    first = post_lookup(client, CNPJ_MASKED, priority=3).get_json()
    queued = queued_messages(app)

    second = post_lookup(client, CNPJ, priority=10)

    assert second.status_code == 202
    joined = second.get_json()
    assert queued_messages(app) == queued  # single flight: no new task
    # Nothing of the first request's own reaches the second: id, priority, times, call ids.
    assert joined["id"] != first["id"] and re.fullmatch(r"[A-Za-z0-9_-]{22,}", joined["id"])
    assert joined["priority"] == 10 and joined["created_at"] >= first["created_at"]
    assert set(joined["tasks"]) == set(first["tasks"])
    assert not set(joined["tasks"].values()) & set(first["tasks"].values())
    assert first["id"] not in second.get_data(as_text=True)
    assert second.headers["Location"] == f"/api/lookups/{joined['id']}"
    read = client.get(joined["links"]["self"]).get_json()
    assert (read["id"], read["priority"], read["tasks"]) == (joined["id"], 10, joined["tasks"])
    for source, task_id in joined["tasks"].items():
        task = client.get(f"/api/tasks/{task_id}").get_json()
        assert (task["lookup_id"], task["source"], task["state"]) == (joined["id"], source, "PENDING")
        assert first["id"] not in orjson.dumps(task).decode()
    # The first request still sees only its own.
    assert client.get(first["links"]["self"]).get_json()["priority"] == 3


def test_refresh_skips_a_full_cache_and_queues_every_source(app, client):
    cache_company(app)

    response = post_lookup(client, refresh=True)

    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued"
    assert set(body["tasks"]) == {"brasilapi", "receitaws", "opencnpj"}


@pytest.mark.parametrize(
    "forms",
    [
        [CNPJ, CNPJ_MASKED, f"  {CNPJ_MASKED}\n"],
        [
            ALPHANUMERIC_CNPJ,
            ALPHANUMERIC_CNPJ.lower(),
            f"{ALPHANUMERIC_CNPJ[:2]}.{ALPHANUMERIC_CNPJ[2:5]}.{ALPHANUMERIC_CNPJ[5:8]}/"
            f"{ALPHANUMERIC_CNPJ[8:12]}-{ALPHANUMERIC_CNPJ[12:]}".lower(),
        ],
    ],
    ids=["numeric", "alphanumeric"],
)
def test_masked_bare_and_lowercase_cnpj_normalize_to_the_same_lookup(app, client, forms):
    bodies = [post_lookup(client, form).get_json() for form in forms]

    assert {body["type"] for body in bodies} == {"cnpj"}
    assert {body["identifier"] for body in bodies} == {forms[0]}
    # One lookup's work, each request under an id of its own.
    assert len({body["id"] for body in bodies}) == len(forms)
    store = services(app).lookups
    assert {store.get(body["id"]).work_id for body in bodies} == {bodies[0]["id"]}


def test_alphanumeric_cnpj_skips_the_numeric_only_source(client):
    body = post_lookup(client, ALPHANUMERIC_CNPJ.lower()).get_json()

    assert set(body["tasks"]) == {"brasilapi", "opencnpj"}


@pytest.mark.parametrize(("raw", "value"), [("01310-100", CEP), (CEP, CEP)])
def test_a_cep_is_detected_from_its_shape(client, raw, value):
    response = post_lookup(client, raw)

    assert response.status_code == 202
    body = response.get_json()
    assert (body["type"], body["identifier"], set(body["tasks"])) == ("cep", value, {"brasilapi", "viacep"})


@pytest.mark.parametrize("raw", ["111.444.777-35", CPF, " 111444777-35 "])
def test_a_cpf_is_answered_at_once_from_the_number_alone_and_nothing_is_stored(
    app, client, redis_client, raw
):
    before = set(redis_client.scan_iter(match=f"{services(app).settings.key_prefix}:*"))

    response = post_lookup(client, raw, priority=9)

    assert response.status_code == 200 and "Location" not in response.headers
    body = response.get_json()
    assert (body["id"], body["status"], body["type"], body["identifier"]) == (None, "complete", "cpf", CPF)
    assert (body["sources"], body["tasks"], body["links"], body["cached"]) == ({}, {}, {}, False)
    assert body["result"] == {
        "cpf": "111.444.777-35",
        "valido": True,
        "regiao_fiscal": 7,
        "ufs": ["ES", "RJ"],
    }
    assert [(c["name"], c["status"]) for c in body["checks"]] == [("check_digits", "pass")]
    assert sum(queued_messages(app).values()) == 0
    # Nothing written: no record, no cache entry, no task, no event log, not even a counter.
    assert set(redis_client.scan_iter(match=f"{services(app).settings.key_prefix}:*")) == before


def test_a_cpf_is_answered_even_while_redis_is_down(down_client):
    response = post_lookup(down_client, "111.444.777-35")

    assert response.status_code == 200 and response.get_json()["result"]["regiao_fiscal"] == 7


@pytest.mark.parametrize(
    ("given", "kind"), [("cep", "cep"), ("CEP", "cep"), (" cnpj ", "cnpj"), ("", "cnpj")]
)
def test_explicit_type_is_accepted_case_insensitively(client, given, kind):
    value = CEP if kind == "cep" else CNPJ
    response = post_lookup(client, value, type=given)

    assert response.status_code == 202
    assert response.get_json()["type"] == kind


def test_explicit_type_is_enforced_against_the_identifier(client):
    assert_error(post_lookup(client, CPF, type="cnpj"), 400, "invalid_identifier", "identifier")
    assert_error(post_lookup(client, CNPJ, type="cpf"), 400, "invalid_identifier", "identifier")


# -- POST /api/lookups: 400, 413 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "identifier",
    [
        "11222333000182",  # CNPJ check digits
        "111.444.777-36",  # CPF check digits
        "11111111111111",  # all equal
        "1122233300018",  # 13 characters
        "112223330001811",  # 15 characters
        "123",
        "00000000",  # CEP that cannot exist
        "",
        "   ",
        "<script>alert(1)</script>",
        "<ScRiPt src=//evil.example/x.js></ScRiPt>",
        "11222333000181<script>",
        "1' OR '1'='1",
        "11222333000181; DROP TABLE lookups; --",
        "11222333000181' --",
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "..\\..\\windows\\win.ini",
        "11222333000181\x00",
        "\x0011222333000181",
        "1122\x1b[31m2333000181",
        "11222333\u202e000181",
        "11222333\r\n000181",
    ],
)
def test_invalid_identifiers_get_400_invalid_identifier(client, identifier):
    assert_error(post_lookup(client, identifier), 400, "invalid_identifier", "identifier")


def test_full_width_digits_are_rejected_naming_the_character(client):
    full_width = "".join(chr(ord(char) - ord("0") + 0xFF10) for char in CNPJ)

    body = assert_error(post_lookup(client, full_width), 400, "invalid_identifier", "identifier")

    assert "U+FF11" in body["message"]
    assert "\uff11" in body["message"]


@pytest.mark.parametrize("identifier", ["11222333000181\x00", "1122\x1b[31m", "11222333\u202e000181"])
def test_control_characters_are_named_by_code_point_not_echoed(client, identifier):
    body = assert_error(post_lookup(client, identifier), 400, "invalid_identifier", "identifier")

    assert re.search(r"U\+[0-9A-F]{4}", body["message"])
    assert not any(char in body["message"] for char in "\x00\x1b\u202e")


def test_identifier_of_10_kilobytes_is_400_not_500(client):
    assert_error(post_lookup(client, "1" * 10_000), 400, "invalid_identifier", "identifier")


def test_body_larger_than_max_content_length_is_413_json(client, settings):
    payload = '{"identifier": "' + "1" * (settings.max_request_bytes + 1024) + '"}'

    response = client.post("/api/lookups", data=payload, content_type="application/json")

    assert response.status_code == 413
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]


@pytest.mark.parametrize(
    "body", [{}, {"type": "cnpj"}, {"priority": 5}], ids=["empty", "type-only", "priority-only"]
)
def test_missing_identifier_is_invalid_request(client, body):
    assert_error(client.post("/api/lookups", json=body), 400, "invalid_request", "identifier")


@pytest.mark.parametrize(
    "identifier",
    [11222333000181, 1.5, True, [CNPJ], {"value": CNPJ}, None],
    ids=["int", "float", "bool", "list", "dict", "null"],
)
def test_non_string_identifier_is_invalid_request(client, identifier):
    assert_error(post_lookup(client, identifier), 400, "invalid_request", "identifier")


@pytest.mark.parametrize("priority", [0, 11, -1, 100, True, False, "5", 5.0, None, [5]])
def test_priority_outside_1_to_10_or_not_an_integer_is_invalid_request(client, priority):
    assert_error(post_lookup(client, priority=priority), 400, "invalid_request", "priority")


@pytest.mark.parametrize("priority", [1, 10])
def test_priority_bounds_are_accepted(client, priority):
    response = post_lookup(client, priority=priority)

    assert response.status_code == 202
    assert response.get_json()["priority"] == priority


@pytest.mark.parametrize("refresh", ["true", 1, 0, None, {}])
def test_refresh_that_is_not_a_boolean_is_invalid_request(client, refresh):
    assert_error(post_lookup(client, refresh=refresh), 400, "invalid_request", "refresh")


@pytest.mark.parametrize("kind", [5, ["cnpj"], {"name": "cnpj"}])
def test_type_that_is_not_a_string_is_invalid_request(client, kind):
    assert_error(post_lookup(client, type=kind), 400, "invalid_request", "type")


@pytest.mark.parametrize("kind", ["rg", "cnpjj", "ie"])
def test_unknown_type_is_invalid_request_on_the_type_field(client, kind):
    assert_error(post_lookup(client, type=kind), 400, "invalid_request", "type")


def test_script_in_the_type_field_is_not_echoed(client):
    response = post_lookup(client, type="<script>alert(1)</script>")

    assert response.status_code == 400
    assert b"<script" not in response.get_data().lower()


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (f'["{CNPJ}"]', "application/json"),
        (f'"{CNPJ}"', "application/json"),
        ("42", "application/json"),
        ("null", "application/json"),
        ("{", "application/json"),
        (f'{{"identifier": "{CNPJ}"', "application/json"),
        (f"identifier={CNPJ}", "application/x-www-form-urlencoded"),
        (f'{{"identifier": "{CNPJ}"}}', "text/plain"),
        (f'{{"identifier": "{CNPJ}"}}', None),
        ("", "application/json"),
        ("", None),
    ],
    ids=[
        "json-list",
        "json-string",
        "json-number",
        "json-null",
        "broken-json",
        "truncated-json",
        "form",
        "text-plain",
        "no-content-type",
        "empty-json",
        "empty",
    ],
)
def test_body_that_is_not_a_json_object_is_invalid_request(client, data, content_type):
    response = client.post("/api/lookups", data=data, content_type=content_type)

    body = assert_error(response, 400, "invalid_request")
    assert "<script" not in body["message"]


def test_get_on_the_lookups_collection_is_a_json_405(client):
    response = client.get("/api/lookups")

    assert response.status_code == 405
    assert response.mimetype == "application/json"


def test_unknown_api_path_is_a_json_404(client):
    response = client.get("/api/<script>alert(1)</script>")

    assert_error(response, 404, "not_found")


# -- GET /api/lookups/<id>, events, tasks -------------------------------------------------------


def test_created_lookup_reads_back_with_per_source_states(client):
    created = post_lookup(client, priority=7).get_json()

    response = client.get(created["links"]["self"])

    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == created["id"]
    assert body["status"] == "queued"
    assert (body["type"], body["identifier"], body["priority"]) == ("cnpj", CNPJ, 7)
    assert set(body["sources"]) == {"brasilapi", "receitaws", "opencnpj"}
    assert {source["state"] for source in body["sources"].values()} == {"pending"}
    assert body["progress"] == {"done": 0, "total": 3}
    assert body["tasks"] == created["tasks"]
    assert body["cached"] is False


def test_cached_lookup_reads_back_complete(app, client):
    cache_company(app)
    created = post_lookup(client).get_json()

    body = client.get(created["links"]["self"]).get_json()

    assert body["status"] == "complete"
    assert body["cached"] is True
    assert body["progress"] == {"done": 3, "total": 3}
    assert body["result"]["razao_social"] == COMPANY["razao_social"]


def test_cached_answers_share_one_stored_body_and_read_back_exactly(app, client, redis_client):
    cache_company(app)
    first = post_lookup(client).get_json()
    second = post_lookup(client).get_json()

    assert first["id"] != second["id"]
    for created in (first, second):
        assert client.get(created["links"]["self"]).get_json() == created
    store = services(app).lookups
    bodies = list(redis_client.scan_iter(match=store.answer_key("*")))
    assert len(bodies) == 1  # the sources' part is stored once; each lookup's own part is its id
    for created in (first, second):
        assert not list(redis_client.scan_iter(match=f"*{created['id']}*"))
        assert redis_client.get(bodies[0]).startswith(b"cnpj\n" + created["identifier"].encode() + b"\n")
    # The body outlives every id naming it (ids read as unknown after LOOKUP_RETENTION).
    assert redis_client.ttl(bodies[0]) > services(app).settings.lookup_retention


@pytest.mark.parametrize(
    "lookup_id",
    ["unknown", "A" * 22, "x" * 5000, "%00", "..%2F..%2Fetc", "<script>alert(1)</script>"],
    ids=["word", "id-shaped", "very-long", "nul", "traversal", "script"],
)
def test_unknown_lookup_is_a_json_404(client, lookup_id):
    assert_error(client.get(f"/api/lookups/{lookup_id}"), 404, "not_found")


@pytest.mark.parametrize("lookup_id", ["unknown", "x" * 5000])
def test_events_of_an_unknown_lookup_are_a_json_404(client, lookup_id):
    assert_error(client.get(f"/api/lookups/{lookup_id}/events"), 404, "not_found")


def test_issued_task_is_known_and_pending(client):
    created = post_lookup(client).get_json()

    for source, task_id in created["tasks"].items():
        response = client.get(f"/api/tasks/{task_id}")
        assert response.status_code == 200
        body = response.get_json()
        assert body["task_id"] == task_id
        assert body["name"] == "job_queue.fetch_source"
        assert body["state"] == "PENDING"
        assert body["lookup_id"] == created["id"]
        assert body["source"] == source


@pytest.mark.parametrize("task_id", ["0" * 32, "made-up", "x" * 5000])
def test_task_the_service_never_issued_is_a_json_404(client, task_id):
    assert_error(client.get(f"/api/tasks/{task_id}"), 404, "not_found")


# -- status and health --------------------------------------------------------------------------


def test_status_reports_breakers_quotas_queues_workers_cache_and_dead_letters(app, client):
    response = client.get("/api/status")

    assert response.status_code == 200
    body = response.get_json()
    for key in ("breakers", "rate_limits", "queues", "workers", "cache", "dead_letters", "health_check"):
        assert key in body, key
    assert set(body["breakers"]) == set(services(app).settings.sources)
    assert {breaker["state"] for breaker in body["breakers"].values()} == {"closed"}
    assert set(body["rate_limits"]) == set(services(app).settings.sources)
    assert set(body["queues"]["by_priority"]) == {str(level) for level in range(1, 11)}
    assert sum(body["queues"]["by_priority"].values()) == 0
    assert body["workers"] == []
    assert body["dead_letters"] == 0
    assert isinstance(body["cache"], dict)


def test_status_counts_queued_messages_at_the_lookups_priority(client):
    post_lookup(client, priority=9)

    depths = client.get("/api/status").get_json()["queues"]["by_priority"]

    assert depths["9"] >= 1
    assert sum(depths.values()) == depths["9"]


def test_healthz_is_200(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_503_without_a_worker_heartbeat(client):
    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["ready"] is False
    assert body["redis"] is True
    assert body["workers"] == []


# -- admin --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "longer", "basic", "bare", "empty-bearer"],
)
def test_admin_endpoints_need_the_bearer_token(client, method, path, headers):
    response = client.open(path, method=method, headers=headers, json={"all": True})

    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
def test_admin_is_off_when_admin_token_is_unset(settings, redis_client, method, path):
    app = _build(dataclasses.replace(settings, admin_token=""))
    try:
        client = app.test_client()
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
            response = client.open(path, method=method, headers=headers, json={"all": True})
            assert_error(response, 403, "admin_disabled")
            assert "WWW-Authenticate" not in response.headers  # no credentials can help
    finally:
        close_app(app)


def test_invalidate_all_bumps_the_generation_so_a_cached_lookup_is_queued_again(app, client):
    cache_company(app)
    assert post_lookup(client).status_code == 200

    response = client.post("/api/admin/cache/invalidate", json={"all": True}, headers=AUTH)

    assert response.status_code == 200
    assert response.get_json() == {"generation": 1}
    assert post_lookup(client).status_code == 202


def test_invalidate_one_identifier_deletes_only_its_entries(app, client):
    cache_company(app, CNPJ)
    cache_company(app, OTHER_CNPJ)

    response = client.post(
        "/api/admin/cache/invalidate", json={"type": "cnpj", "identifier": CNPJ_MASKED}, headers=AUTH
    )

    assert response.status_code == 200
    assert response.get_json() == {"deleted": 3}
    cache = services(app).cache
    assert cache.get_many("cnpj", ["brasilapi", "receitaws", "opencnpj"], CNPJ) == {}
    assert len(cache.get_many("cnpj", ["brasilapi", "receitaws", "opencnpj"], OTHER_CNPJ)) == 3
    assert post_lookup(client, CNPJ).status_code == 202
    assert post_lookup(client, OTHER_CNPJ).status_code == 200


def test_invalidate_a_type_deletes_every_entry_of_that_type(app, client):
    fill_cache(app, "cep", CEP, PLACE)
    fill_cache(app, "cep", OTHER_CEP, {**PLACE, "cep": OTHER_CEP})
    fill_cache(app, "cnpj", CNPJ, COMPANY)

    response = client.post("/api/admin/cache/invalidate", json={"type": "cep"}, headers=AUTH)

    assert response.status_code == 200
    assert response.get_json() == {"deleted": 4}
    cache = services(app).cache
    assert cache.get_many("cep", ["brasilapi", "viacep"], CEP) == {}
    assert len(cache.get_many("cnpj", ["brasilapi", "receitaws", "opencnpj"], CNPJ)) == 3


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"json": {}}, "invalid_request"),
        ({"json": {"all": "yes"}}, "invalid_request"),
        ({"json": {"type": "rg"}}, "invalid_request"),
        ({"json": {"type": ["cnpj"]}}, "invalid_request"),
        ({"json": ["all"]}, "invalid_request"),
        ({"data": "{", "content_type": "application/json"}, "invalid_request"),
        ({"data": "all=true", "content_type": "application/x-www-form-urlencoded"}, "invalid_request"),
        ({"json": {"type": "cnpj", "identifier": "11222333000182"}}, "invalid_identifier"),
        ({"json": {"type": "cnpj", "identifier": "<script>alert(1)</script>"}}, "invalid_identifier"),
    ],
)
def test_invalidate_with_a_bad_body_is_400(client, kwargs, error):
    assert_error(client.post("/api/admin/cache/invalidate", headers=AUTH, **kwargs), 400, error)


def test_forcing_a_breaker_open_and_resetting_it_shows_in_status(client):
    opened = client.post("/api/admin/breakers/receitaws/open", headers=AUTH)

    assert opened.status_code == 200
    assert opened.get_json()["state"] == "open"
    breakers = client.get("/api/status").get_json()["breakers"]
    assert breakers["receitaws"]["state"] == "open"
    assert breakers["brasilapi"]["state"] == "closed"

    reset = client.post("/api/admin/breakers/receitaws/reset", headers=AUTH)

    assert reset.status_code == 200
    assert reset.get_json()["state"] == "closed"
    assert client.get("/api/status").get_json()["breakers"]["receitaws"]["state"] == "closed"


@pytest.mark.parametrize("action", ["reset", "open"])
@pytest.mark.parametrize(
    "source",
    [
        "nosuchsource",
        "x" * 300,
        "<script>",
    ],
    ids=["name", "long", "script"],
)
def test_breaker_of_an_unknown_source_is_404(client, action, source):
    assert_error(client.post(f"/api/admin/breakers/{source}/{action}", headers=AUTH), 404, "not_found")


def test_dead_letters_list_counts_and_shows_entries(app, client):
    empty = client.get("/api/admin/dead-letters", headers=AUTH)
    assert empty.status_code == 200
    assert empty.get_json() == {"count": 0, "items": []}

    entry_id = services(app).dead_letters.add("lookup-1", "receitaws", "cnpj", CNPJ, 5, "HTTP 503", 5)
    body = client.get("/api/admin/dead-letters", headers=AUTH).get_json()

    assert body["count"] == 1
    assert [item["id"] for item in body["items"]] == [entry_id]
    assert body["items"][0]["source"] == "receitaws"


def test_requeue_of_an_unknown_dead_letter_is_404(client):
    assert_error(
        client.post("/api/admin/dead-letters/0123456789abcdef/requeue", headers=AUTH), 404, "not_found"
    )


def test_requeue_of_a_dead_letter_issues_a_known_task(app, client):
    lookup_id = post_lookup(client).get_json()["id"]
    entry_id = services(app).dead_letters.add(lookup_id, "receitaws", "cnpj", CNPJ, 9, "HTTP 503", 5)
    queued = sum(queued_messages(app).values())

    response = client.post(f"/api/admin/dead-letters/{entry_id}/requeue", headers=AUTH)

    assert response.status_code == 202
    body = response.get_json()
    assert body["id"] == entry_id
    task = client.get(f"/api/tasks/{body['task_id']}")
    assert task.status_code == 200
    assert task.get_json()["name"] == "job_queue.fetch_source"
    assert task.get_json()["lookup_id"] == lookup_id
    assert sum(queued_messages(app).values()) == queued + 1
    assert client.get("/api/admin/dead-letters", headers=AUTH).get_json()["count"] == 0


# -- Redis down ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def down_client():
    """An app whose Redis URL points at a closed port."""
    settings = Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="tdown")
    app = _build(settings)
    yield app.test_client()
    close_app(app)


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(lambda client: post_lookup(client), id="post-lookup"),
        pytest.param(lambda client: client.get("/api/lookups/x"), id="get-lookup"),
        pytest.param(lambda client: client.get("/api/lookups/x/events"), id="events"),
        pytest.param(lambda client: client.get("/api/tasks/x"), id="task"),
        pytest.param(lambda client: client.get("/api/status"), id="status"),
    ],
)
def test_api_answers_503_at_once_when_redis_is_down(down_client, request_):
    response, elapsed = timed(lambda: request_(down_client))

    assert_error(response, 503, "unavailable")
    assert elapsed < 2.5, f"took {elapsed:.2f}s"


@pytest.fixture(scope="module")
def hung_client():
    """An app whose Redis accepts connections and never answers (a hung server, a dropped network)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        app = _build(Settings.from_env({}, redis_url=f"redis://127.0.0.1:{port}/0", key_prefix="thung"))
        yield app.test_client()
        close_app(app)


def test_api_answers_503_within_the_socket_timeout_when_redis_hangs(hung_client):
    response, elapsed = timed(lambda: hung_client.get("/api/lookups/x"))

    assert_error(response, 503, "unavailable")
    assert elapsed < 2.5, f"took {elapsed:.2f}s"


def test_healthz_stays_200_and_readyz_is_503_when_redis_is_down(down_client):
    assert down_client.get("/healthz").status_code == 200

    response, elapsed = timed(lambda: down_client.get("/readyz"))

    assert response.status_code == 503
    assert response.get_json()["ready"] is False
    assert response.get_json()["redis"] is False
    assert elapsed < 2.5


def test_a_record_created_without_a_claim_reads_back(app):
    import time

    from enrich.lookups import Lookup, LookupStatus, SourceResult, SourceState, new_lookup_id

    now = time.time()
    lookup = Lookup(
        id=new_lookup_id(),
        type="cep",
        identifier=CEP,
        priority=5,
        status=LookupStatus.QUEUED,
        created_at=now,
        deadline_at=now + 15,
        sources={"viacep": SourceResult("viacep", SourceState.PENDING)},
    )
    store = services(app).lookups
    assert store.create(lookup) is None
    read = store.get(lookup.id)
    assert read is not None and read.to_dict() == lookup.to_dict()


@pytest.mark.parametrize(
    "event_id", ["99999999999999999999-0", "1-99999999999999999999", "18446744073709551616-0"]
)
def test_an_event_id_past_64_bits_is_a_400_not_a_redis_error(app, client, event_id):
    cache_company(app)
    lookup = post_lookup(client).get_json()  # complete at once, from the cache
    batch = client.post("/api/batches", json={"identifiers": ["not-an-identifier"]}).get_json()  # complete
    for path in (lookup["links"]["events"], batch["links"]["events"]):
        response = client.get(path, headers={"Last-Event-ID": event_id})
        assert_error(response, 400, "invalid_request", "last_event_id")
    assert (
        client.get(lookup["links"]["events"], headers={"Last-Event-ID": "18446744073709551615-0"}).status_code
        == 200
    )


def test_a_cached_answer_makes_no_redis_round_trip_once_warm(app, client, redis_client):
    """What a cached answer needs is in the process (near cache, merged body, sealed id): its
    only Redis traffic is the body's presence check, at most once a second per process."""
    cache_company(app)
    first = post_lookup(client).get_json()
    assert first["cached"] is True
    near = services(app).cache.near
    deadline = time.monotonic() + 10
    while near is not None and not near.live and time.monotonic() < deadline:
        time.sleep(0.02)  # the near cache's subscription comes up in the background
    post_lookup(client)  # fills the near cache now that it is live

    def commands() -> int:
        stats = redis_client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_"))

    before = commands()
    answers = [post_lookup(client) for _ in range(50)]
    made = commands() - before - 1  # the first INFO counts itself
    assert all(answer.status_code == 200 and answer.get_json()["cached"] for answer in answers)
    # At most: one presence check (a second may pass during the loop), one counter flush.
    assert made <= 4, made
    for answer in answers[:3]:
        assert client.get(answer.get_json()["links"]["self"]).get_json() == answer.get_json()
