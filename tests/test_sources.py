"""Source adapters: parsing real upstream bodies into the normalized schemas, and fetch() over real HTTP."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import orjson
import pytest
import requests

from devstack.embedded_redis import free_port
from enrich import sources
from enrich.identifiers import Identifier, IdentifierType
from enrich.settings import Settings, SourceSettings
from enrich.sources import (
    ADDRESS_KEYS,
    CEP_KEYS,
    CNAE_KEYS,
    CNPJ_KEYS,
    MAX_BODY_BYTES,
    PARTNER_KEYS,
    BadResponse,
    NotFound,
    RateLimited,
    SourceError,
    TransientError,
    UpstreamRejected,
    build_sources,
    sources_for,
)
from enrich.sources import adapters as source_adapters

pytest_plugins = ["sandbox_fixture"]  # the sandbox and sandbox_url fixtures

DATA = Path(__file__).parent / "data" / "upstream"
SOURCES = build_sources(Settings.from_env({}))
BRASILAPI, RECEITAWS, OPENCNPJ, VIACEP = (
    SOURCES[name] for name in ("brasilapi", "receitaws", "opencnpj", "viacep")
)


def cnpj(value: str) -> Identifier:
    return Identifier(IdentifierType.CNPJ, value)


def cep(value: str) -> Identifier:
    return Identifier(IdentifierType.CEP, value)


def cpf(value: str) -> Identifier:
    return Identifier(IdentifierType.CPF, value)


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


def json_body(value: object) -> bytes:
    return orjson.dumps(value)


# (source, identifier, reference file) for every 200 body of the reference set
CNPJ_ANSWERS = [
    (BRASILAPI, cnpj("19131243000197"), "brasilapi_cnpj_v1_200.json"),
    (BRASILAPI, cnpj("19131243000197"), "minhareceita_200_19131243000197.json"),  # BrasilAPI proxies it
    (RECEITAWS, cnpj("27865757000102"), "receitaws_200.json"),
    (OPENCNPJ, cnpj("12ABC34501DE35"), "opencnpj_200_min.json"),
]
CEP_ANSWERS = [
    (BRASILAPI, cep("05010000"), "brasilapi_cep_v2_200.json"),
    (BRASILAPI, cep("05010000"), "brasilapi_cep_v1_200.json"),
    (BRASILAPI, cep("87360000"), "brasilapi_cep_v2_200_no_street.json"),
    (VIACEP, cep("01001000"), "viacep_200.json"),
]


# ---------------------------------------------------------------------------------------------------------
# Normalized schemas


@pytest.mark.parametrize(("source", "identifier", "name"), CNPJ_ANSWERS, ids=lambda value: str(value)[:40])
def test_every_cnpj_source_returns_the_same_keys(source, identifier, name):
    company = source.parse(identifier, 200, body(name))
    assert tuple(company) == CNPJ_KEYS
    assert tuple(company["endereco"]) == ADDRESS_KEYS
    for cnae in [company["cnae_principal"], *company["cnaes_secundarios"]]:
        assert tuple(cnae) == CNAE_KEYS
        assert len(cnae["codigo"]) == 7 and cnae["codigo"].isdigit()
    for partner in company["socios"]:
        assert tuple(partner) == PARTNER_KEYS
    assert company["cnpj"] == identifier.value


@pytest.mark.parametrize(("source", "identifier", "name"), CEP_ANSWERS, ids=lambda value: str(value)[:40])
def test_every_cep_source_returns_the_same_keys(source, identifier, name):
    place = source.parse(identifier, 200, body(name))
    assert tuple(place) == CEP_KEYS
    assert place["cep"] == identifier.value


def test_brasilapi_cnpj_is_normalized():
    company = BRASILAPI.parse(cnpj("19131243000197"), 200, body("brasilapi_cnpj_v1_200.json"))
    assert company["razao_social"] == "OPEN KNOWLEDGE BRASIL"
    assert company["situacao_cadastral"] == "ATIVA"
    assert company["data_abertura"] == "2013-10-03"
    assert company["data_situacao_cadastral"] == "2013-10-03"
    assert company["natureza_juridica"] == "Associação Privada"
    assert company["capital_social"] == 0.0 and isinstance(company["capital_social"], float)
    assert company["cnae_principal"] == {
        "codigo": "9430800",
        "descricao": "Atividades de associações de defesa de direitos sociais",
    }
    assert len(company["cnaes_secundarios"]) == 5
    assert company["endereco"] == {
        "logradouro": "AVENIDA PAULISTA 37",
        "numero": "37",
        "complemento": "ANDAR 4",
        "bairro": "BELA VISTA",
        "municipio": "SAO PAULO",
        "uf": "SP",
        "cep": "01311902",
    }
    assert company["telefone"] == "(11) 2385-1939"
    assert company["email"] is None
    assert company["socios"] == [{"nome": "SOCIO EXEMPLO 1", "qualificacao": "Presidente"}]


def test_receitaws_dates_capital_and_masked_values_are_normalized():
    company = RECEITAWS.parse(cnpj("27865757000102"), 200, body("receitaws_200.json"))
    assert company["cnpj"] == "27865757000102"  # from "27.865.757/0001-02"
    assert company["endereco"]["cep"] == "22460901"  # from "22.460-901"
    assert company["data_abertura"] == "1986-01-31"  # from "31/01/1986"
    assert company["data_situacao_cadastral"] == "2005-11-03"
    assert company["capital_social"] == pytest.approx(6983568523.86)  # from the string "6983568523.86"
    assert company["natureza_juridica"] == "Sociedade Anônima Fechada"  # without "205-4 - "
    assert company["cnae_principal"] == {"codigo": "6021700", "descricao": "Atividades de televisão aberta"}
    assert company["socios"] == [{"nome": "SOCIO EXEMPLO 3", "qualificacao": "Diretor"}]  # without "10-"
    assert company["telefone"] == "(21) 2155-4551"
    assert company["email"] is None and company["endereco"]["complemento"] is None  # "" means missing


def test_opencnpj_minimal_answer_leaves_missing_values_none():
    company = OPENCNPJ.parse(cnpj("12ABC34501DE35"), 200, body("opencnpj_200_min.json"))
    assert company["cnpj"] == "12ABC34501DE35"
    assert company["situacao_cadastral"] == "ATIVA"
    assert company["porte"] == "DEMAIS"
    assert company["cnae_principal"] == {"codigo": "6201501", "descricao": None}
    assert (
        company["capital_social"] is None and company["socios"] == [] and company["cnaes_secundarios"] == []
    )
    assert company["endereco"]["municipio"] == "SAO PAULO" and company["endereco"]["cep"] is None


def test_opencnpj_full_answer_converts_comma_capital_title_case_status_and_phones():
    answer = {
        "cnpj": "11222333000181",
        "razao_social": "EMPRESA LTDA",
        "situacao_cadastral": "Baixada",
        "data_situacao_cadastral": "2020-05-04",
        "data_inicio_atividade": "2001-02-03",
        "cnae_principal": "111301",
        "cnaes_secundarios": ["6204000"],
        "cnaes": [{"codigo": "6204000", "descricao": "Consultoria em TI", "is_principal": False}],
        "natureza_juridica": "Sociedade Empresária Limitada (2062)",
        "logradouro": "RUA A",
        "cep": "1310100",
        "uf": "sp",
        "telefones": [{"ddd": "11", "numero": "0", "is_fax": True}, {"ddd": "11", "numero": "32345678"}],
        "capital_social": "1.234,56",
        "porte_empresa": "ME",
        "QSA": [{"nome_socio": "FULANO", "qualificacao_socio": "Sócio"}],
    }
    company = OPENCNPJ.parse(cnpj("11222333000181"), 200, json_body(answer))
    assert company["capital_social"] == pytest.approx(1234.56)
    assert company["situacao_cadastral"] == "BAIXADA"
    assert company["natureza_juridica"] == "Sociedade Empresária Limitada"
    assert company["porte"] == "MICRO EMPRESA"
    assert company["cnae_principal"] == {"codigo": "0111301", "descricao": None}  # leading zero restored
    assert company["cnaes_secundarios"] == [{"codigo": "6204000", "descricao": "Consultoria em TI"}]
    assert company["endereco"]["cep"] == "01310100" and company["endereco"]["uf"] == "SP"
    assert company["telefone"] == "(11) 3234-5678"  # the fax is skipped
    assert company["socios"] == [{"nome": "FULANO", "qualificacao": "Sócio"}]


def test_brasilapi_numeric_cnae_and_no_secondary_activity_marker():
    answer = {
        "cnpj": "11222333000181",
        "razao_social": "X",
        "cnae_fiscal": 111301,
        "cnaes_secundarios": [{"codigo": 0, "descricao": ""}],
        "capital_social": 1500.5,
    }
    company = BRASILAPI.parse(cnpj("11222333000181"), 200, json_body(answer))
    assert company["cnae_principal"] == {"codigo": "0111301", "descricao": None}
    assert company["cnaes_secundarios"] == []
    assert company["capital_social"] == 1500.5


def test_cep_sources_are_normalized():
    brasilapi = BRASILAPI.parse(cep("05010000"), 200, body("brasilapi_cep_v2_200.json"))
    assert brasilapi == {
        "cep": "05010000",
        "logradouro": "Rua Caiubi",
        "complemento": None,
        "bairro": "Perdizes",
        "municipio": "São Paulo",
        "uf": "SP",
        "ibge": "3550308",
        "ddd": None,
        "latitude": pytest.approx(-23.5355),
        "longitude": pytest.approx(-46.6788),
    }
    no_street = BRASILAPI.parse(cep("87360000"), 200, body("brasilapi_cep_v2_200_no_street.json"))
    assert (
        no_street["logradouro"] is None
        and no_street["latitude"] is None
        and no_street["municipio"] == "Goioerê"
    )
    viacep = VIACEP.parse(cep("01001000"), 200, body("viacep_200.json"))
    assert viacep["cep"] == "01001000"  # from "01001-000"
    assert (viacep["municipio"], viacep["uf"], viacep["ibge"], viacep["ddd"]) == (
        "São Paulo",
        "SP",
        "3550308",
        "11",
    )
    assert viacep["complemento"] == "lado ímpar"


def test_no_source_is_ever_asked_about_a_cpf():
    # A CPF is answered from the number alone (cpf_answers.py): no adapter takes one.
    assert sources_for(IdentifierType.CPF, SOURCES) == []
    assert not any(source.supports(cpf("11144477735")) for source in SOURCES.values())


# ---------------------------------------------------------------------------------------------------------
# Upstream errors


@pytest.mark.parametrize("name", ["viacep_not_found_bool.json", "viacep_not_found_string.json"])
def test_viacep_erro_true_or_string_true_is_not_found(name):
    with pytest.raises(NotFound, match="viacep: CEP 01001-000 not found") as caught:
        VIACEP.parse(cep("01001000"), 200, body(name))
    assert caught.value.reason == "not_found"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("CNPJ inválido", UpstreamRejected),
        ("CNPJ rejeitado pela Receita Federal", NotFound),
        ("CNPJ não encontrado", NotFound),
        ("Too many requests, please try again later.", RateLimited),
        ("Erro ao consultar a Receita Federal", TransientError),
    ],
)
def test_receitaws_error_inside_http_200_maps_to_its_exception(message, error):
    answer = json_body({"status": "ERROR", "message": message})
    with pytest.raises(SourceError) as caught:
        RECEITAWS.parse(cnpj("27865757000102"), 200, answer)
    assert type(caught.value) is error
    assert message in caught.value.message and "27.865.757/0001-02" in caught.value.message


def test_receitaws_reference_error_is_rejected():
    with pytest.raises(UpstreamRejected, match="CNPJ inválido"):
        RECEITAWS.parse(cnpj("27865757000102"), 200, body("receitaws_error.json"))


@pytest.mark.parametrize(
    ("identifier", "status", "name", "error", "words"),
    [
        (cnpj("11222333000181"), 404, "brasilapi_cnpj_v1_404.json", NotFound, "não encontrado"),
        (cnpj("11222333000181"), 400, "brasilapi_cnpj_v1_400.json", UpstreamRejected, "inválido"),
        (cep("01310100"), 404, "brasilapi_cep_404.json", NotFound, "Todos os serviços de CEP"),
        (cep("01310100"), 400, "brasilapi_cep_400.json", UpstreamRejected, "exatamente 8 caracteres"),
    ],
)
def test_brasilapi_http_errors(identifier, status, name, error, words):
    with pytest.raises(SourceError) as caught:
        BRASILAPI.parse(identifier, status, body(name))
    assert type(caught.value) is error
    assert caught.value.status == status and words in caught.value.message


def test_brasilapi_internal_error_is_transient_not_final():
    answer = json_body({"name": "InternalError", "message": "Erro interno.", "type": "internal_error"})
    with pytest.raises(TransientError, match="HTTP 500: internal_error") as caught:
        BRASILAPI.parse(cnpj("11222333000181"), 500, answer)
    assert type(caught.value) is TransientError and caught.value.status == 500


@pytest.mark.parametrize(
    ("status", "name", "error"),
    [(404, "opencnpj_404.json", NotFound), (400, "opencnpj_400.json", UpstreamRejected)],
)
def test_opencnpj_http_errors(status, name, error):
    with pytest.raises(error):
        OPENCNPJ.parse(cnpj("12ABC34501DE35"), status, body(name))


def test_429_is_rate_limited_with_retry_after_from_the_header():
    with pytest.raises(RateLimited, match="Muitas requisições|Excedido") as caught:
        RECEITAWS.parse(cnpj("27865757000102"), 429, body("cnpjws_429.json"), {"Retry-After": "42"})
    assert caught.value.retry_after == 42
    in_a_minute = formatdate(time.time() + 60, usegmt=True)
    with pytest.raises(RateLimited) as caught:
        OPENCNPJ.parse(cnpj("11222333000181"), 429, b"", {"Retry-After": in_a_minute})
    assert 55 <= caught.value.retry_after <= 61
    with pytest.raises(RateLimited) as caught:
        OPENCNPJ.parse(cnpj("11222333000181"), 429, b"")
    assert caught.value.retry_after is None


GARBAGE = [
    (b"<!DOCTYPE html><html><body>Cloudflare: checking your browser</body></html>", "HTML instead of JSON"),
    (b"{razao_social: 1}", "not valid JSON"),
    (body("brasilapi_cnpj_v1_200.json")[:700], "truncated"),
    (b"[1, 2, 3]", "expected a JSON object, got a list"),
    (b'"ok"', "expected a JSON object, got a string"),
    (b"", "empty body"),
    (b'{"cnpj": "11222333000181", "razao_social": ["X"]}', "field 'razao_social' should be text, got a list"),
    (
        b'{"razao_social": "X", "data_inicio_atividade": "31/02/2020"}',
        "'data_inicio_atividade' should be a date",
    ),
    (b'{"razao_social": "X", "capital_social": "muito"}', "'capital_social' should be an amount"),
    (b'{"razao_social": "X", "qsa": {"nome_socio": "A"}}', "'qsa' should be a list"),
    (b'{"razao_social": "X", "qsa": [{"nome_socio": {"a": 1}}]}', "'qsa[0].nome_socio' should be text"),
    (b'{"razao_social": "X", "cnpj": "99888777000166"}', "answered for '99888777000166'"),
    (b'{"nome_fantasia": "X"}', "no razao_social"),
]


@pytest.mark.parametrize(("answer", "message"), GARBAGE, ids=[message for _, message in GARBAGE])
def test_garbage_bodies_are_bad_responses_with_a_clear_message(answer, message):
    with pytest.raises(BadResponse) as caught:
        BRASILAPI.parse(cnpj("11222333000181"), 200, answer)
    assert message in caught.value.message
    assert caught.value.message.startswith("brasilapi: ")


def test_garbage_from_other_sources_is_a_bad_response():
    with pytest.raises(BadResponse, match="viacep: expected a JSON object, got a list"):
        VIACEP.parse(cep("01001000"), 200, b"[]")
    with pytest.raises(BadResponse, match="receitaws: answered HTML"):
        RECEITAWS.parse(cnpj("27865757000102"), 200, b"<html>Erro</html>")
    with pytest.raises(BadResponse, match="unexpected status 'MAYBE'"):
        RECEITAWS.parse(cnpj("27865757000102"), 200, b'{"status": "MAYBE"}')
    with pytest.raises(BadResponse, match="'telefones' should be a list"):
        OPENCNPJ.parse(cnpj("11222333000181"), 200, b'{"razao_social": "X", "telefones": "11 3333-4444"}')


# ---------------------------------------------------------------------------------------------------------
# Which source serves what


def test_receitaws_does_not_support_an_alphanumeric_cnpj():
    alphanumeric = cnpj("12ABC34501DE35")
    assert not RECEITAWS.supports(alphanumeric)
    assert RECEITAWS.supports(cnpj("11222333000181"))
    assert BRASILAPI.supports(alphanumeric) and OPENCNPJ.supports(alphanumeric)
    with pytest.raises(UpstreamRejected, match="receitaws cannot look up CNPJ 12.ABC.345/01DE-35"):
        RECEITAWS.parse(alphanumeric, 200, body("receitaws_200.json"))

    class NoNetwork(requests.Session):
        def request(self, *args, **kwargs):
            raise AssertionError("an unsupported identifier must not reach the network")

    with pytest.raises(UpstreamRejected):
        RECEITAWS.fetch(alphanumeric, NoNetwork())


def test_sources_for_each_type_in_a_stable_order():
    assert [source.name for source in sources_for("cnpj", SOURCES)] == ["brasilapi", "receitaws", "opencnpj"]
    assert [source.name for source in sources_for("cep", SOURCES)] == ["brasilapi", "viacep"]
    alphanumeric = cnpj("12ABC34501DE35")
    usable = [source.name for source in sources_for("cnpj", SOURCES) if source.supports(alphanumeric)]
    assert usable == ["brasilapi", "opencnpj"]


def test_urls_follow_each_upstream_path():
    settings = Settings.from_env({}, sandbox_port=9999)
    urls = {name: source for name, source in build_sources(settings).items()}
    assert (
        urls["brasilapi"].url(cnpj("12ABC34501DE35"))
        == "http://127.0.0.1:9999/brasilapi/api/cnpj/v1/12ABC34501DE35"
    )
    assert urls["brasilapi"].url(cep("01310100")) == "http://127.0.0.1:9999/brasilapi/api/cep/v2/01310100"
    assert (
        urls["receitaws"].url(cnpj("11222333000181"))
        == "http://127.0.0.1:9999/receitaws/v1/cnpj/11222333000181"
    )
    assert urls["opencnpj"].url(cnpj("11222333000181")) == "http://127.0.0.1:9999/opencnpj/11222333000181"
    assert urls["viacep"].url(cep("01310100")) == "http://127.0.0.1:9999/viacep/ws/01310100/json/"
    live = build_sources(Settings.from_env({"SOURCES_MODE": "live"}))
    assert live["viacep"].url(cep("01310100")) == "https://viacep.com.br/ws/01310100/json/"
    assert live["receitaws"].to_dict()["types"] == ["cnpj"]


def test_build_sources_needs_source_settings():
    with pytest.raises(ValueError, match="Settings.from_env"):
        build_sources(Settings())


# ---------------------------------------------------------------------------------------------------------
# fetch() over real HTTP against the sandbox


def sandbox_sources(url: str, **environ: str) -> dict[str, sources.Source]:
    port = int(url.rsplit(":", 1)[1])
    return build_sources(Settings.from_env(environ, sandbox_port=port))


def test_fetch_known_identifiers_from_every_source(sandbox):
    live = sandbox_sources(sandbox.url)
    company = cnpj("11222333000181")
    answers = {name: live[name].fetch(company) for name in ("brasilapi", "receitaws", "opencnpj")}
    for answer in answers.values():
        assert tuple(answer) == CNPJ_KEYS and answer["cnpj"] == "11222333000181"
    assert len({answer["razao_social"] for answer in answers.values()}) == 1
    place = cep(answers["brasilapi"]["endereco"]["cep"])
    places = [live["brasilapi"].fetch(place), live["viacep"].fetch(place)]
    assert all(tuple(answer) == CEP_KEYS for answer in places)
    assert places[0]["uf"] == places[1]["uf"] == answers["receitaws"]["endereco"]["uf"]
    alphanumeric = live["opencnpj"].fetch(cnpj("12ABC34501DE35"))
    assert alphanumeric["cnpj"] == "12ABC34501DE35"


def test_fetch_not_found_from_every_source(sandbox):
    live = sandbox_sources(sandbox.url)
    missing_company = cnpj(sandbox.unknown("cnpj"))
    for name in ("brasilapi", "receitaws", "opencnpj"):
        with pytest.raises(NotFound):
            live[name].fetch(missing_company)
    missing_place = cep(sandbox.unknown("cep"))
    for name in ("brasilapi", "viacep"):
        with pytest.raises(NotFound):
            live[name].fetch(missing_place)


def test_fetch_outage_and_injected_errors_are_transient(sandbox):
    live = sandbox_sources(sandbox.url)
    sandbox.control("viacep", outage=True)
    with pytest.raises(TransientError, match="HTTP 503") as caught:
        live["viacep"].fetch(cep("01310100"))
    assert caught.value.status == 503 and not isinstance(caught.value, BadResponse)
    sandbox.control("brasilapi", error_rate=1.0)
    with pytest.raises(TransientError, match="internal_error") as caught:
        live["brasilapi"].fetch(cnpj("11222333000181"))
    assert caught.value.status == 500


def test_fetch_over_quota_is_rate_limited_with_retry_after(sandbox):
    live = sandbox_sources(sandbox.url)
    sandbox.control("opencnpj", quota_per_minute=1)
    live["opencnpj"].fetch(cnpj("11222333000181"))
    with pytest.raises(RateLimited) as caught:
        live["opencnpj"].fetch(cnpj("11222333000181"))
    assert 1 <= caught.value.retry_after <= 60


def test_fetch_gives_up_at_the_timeout(sandbox):
    live = sandbox_sources(sandbox.url, TIMEOUT_BRASILAPI="0.3")
    sandbox.control("brasilapi", latency_ms=3000)
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"no answer within 0.3s"):
        live["brasilapi"].fetch(cnpj("11222333000181"))
    assert time.monotonic() - started < 2.0


def test_fetch_unreachable_upstream_is_transient():
    settings = SourceSettings("viacep", f"http://127.0.0.1:{free_port()}/viacep", 600, 1, 2.0, 5, 30, 1)
    source = source_adapters.ViaCEP(name="viacep", types=("cep",), settings=settings)
    with pytest.raises(TransientError, match="connection to http://127.0.0.1:.* failed"):
        source.fetch(cep("01310100"))


def test_default_session_is_shared_and_identifies_the_service():
    session = sources.default_session()
    assert sources.default_session() is session
    assert session.headers["User-Agent"].startswith("enrichment-lookup/")


# ---------------------------------------------------------------------------------------------------------
# A misbehaving upstream: oversized, cut-off and HTML bodies over real HTTP


class _MisbehavingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    user_agents: list[str] = []

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        pass

    def do_GET(self):  # noqa: N802  (http.server's naming)
        self.user_agents.append(self.headers.get("User-Agent", ""))
        kind = self.path.split("/")[1]  # /big/ws/01310100/json/ -> big
        if kind == "big":  # declared too large
            self._send(b"{" + b" " * (MAX_BODY_BYTES + 10) + b"}")
        elif kind == "chunked":  # too large, without Content-Length
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b" " * 65536
            for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif kind == "cut":  # promises 1000 bytes, sends 20, hangs up
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"cep": "01310100", ')
            self.close_connection = True
        elif kind in ("gzip", "bomb"):  # bomb: 8 KB on the wire, over 2 MB once decompressed
            payload = (
                body("viacep_200.json") if kind == "gzip" else b"[" + b" " * (MAX_BODY_BYTES + 10) + b"]"
            )
            compressed = gzip.compress(payload)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(compressed)))
            self.end_headers()
            self.wfile.write(compressed)
        elif kind in ("stall", "drip"):  # stall: goes quiet mid-body; drip: a byte every 50 ms for 3 s
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "60")
            self.end_headers()
            self.wfile.write(b"{")
            self.wfile.flush()
            for _ in range(60 if kind == "drip" else 1):
                time.sleep(0.05 if kind == "drip" else 3)
                self.wfile.write(b" ")
                self.wfile.flush()
        else:
            self._send(b"<html><body>Sorry</body></html>", "text/html")

    def _send(self, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients hanging up on oversized bodies is the point of these tests


@pytest.fixture(scope="module")
def misbehaving_url() -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _MisbehavingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def misbehaving_source(base_url: str, kind: str, timeout: float = 5.0) -> sources.Source:
    settings = SourceSettings("viacep", f"{base_url}/{kind}", 600, 1, timeout, 5, 30, 1)
    return source_adapters.ViaCEP(name="viacep", types=("cep",), settings=settings)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("big", f"over the {MAX_BODY_BYTES} byte limit"),
        ("chunked", f"larger than the {MAX_BODY_BYTES} byte limit"),
        ("cut", "body cut off"),
        ("bomb", f"larger than the {MAX_BODY_BYTES} byte limit"),
        ("html", "answered HTML instead of JSON"),
    ],
)
def test_fetch_rejects_oversized_cut_off_and_html_bodies(misbehaving_url, kind, message):
    with pytest.raises(BadResponse, match=message):
        misbehaving_source(misbehaving_url, kind).fetch(cep("01310100"))
    assert _MisbehavingHandler.user_agents[-1].startswith("enrichment-lookup/")


def test_fetch_decodes_a_gzip_body(misbehaving_url):
    place = misbehaving_source(misbehaving_url, "gzip").fetch(cep("01001000"))
    assert place["municipio"] == "São Paulo"


@pytest.mark.parametrize(("kind", "message"), [("stall", "stalled past 0.5s"), ("drip", "longer than 0.5s")])
def test_fetch_bounds_the_whole_answer_by_the_timeout(misbehaving_url, kind, message):
    started = time.monotonic()
    with pytest.raises(TransientError, match=message):
        misbehaving_source(misbehaving_url, kind, timeout=0.5).fetch(cep("01310100"))
    assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------------------------------------
# The send gate: when a fetch's request goes out (the rate limiter's send slot)


class _RecordingGate:
    """A gate that notes each step, whether the sandbox had seen the request yet, and when."""

    def __init__(self, sandbox, refuse_at_wire: bool = False) -> None:
        self.sandbox, self.refuse_at_wire = sandbox, refuse_at_wire
        self.steps: list[tuple[str, int]] = []
        self.at_wire_time = 0.0

    def before_send(self) -> None:
        self.steps.append(("before_send", self.sandbox.served("viacep")))

    def at_wire(self) -> None:
        self.steps.append(("at_wire", self.sandbox.served("viacep")))
        if self.refuse_at_wire:
            raise LookupError("not now")
        self.at_wire_time = time.time()


def _sandbox_viacep(sandbox) -> sources.Source:
    port = int(sandbox.url.rsplit(":", 1)[1])
    return build_sources(Settings.from_env({}, sandbox_port=port))["viacep"]


def test_a_gate_runs_once_the_request_is_built_and_last_right_before_its_first_byte(sandbox):
    viacep = _sandbox_viacep(sandbox)
    for number in range(2):  # a new connection, then the same one kept alive
        gate = _RecordingGate(sandbox)
        assert viacep.fetch(cep("01310100"), gate=gate)["cep"] == "01310100"
        assert gate.steps == [("before_send", number), ("at_wire", number)]  # nothing sent before either
        arrived = sandbox.arrivals("viacep")[-1]  # the kernel's stamp of the request's arrival
        assert gate.at_wire_time <= arrived < gate.at_wire_time + 1.0


def test_a_gate_that_refuses_at_the_wire_sends_nothing_and_leaves_the_connection_pool_sound(sandbox):
    viacep = _sandbox_viacep(sandbox)
    viacep.fetch(cep("01310100"))  # a kept-alive connection to reuse
    with pytest.raises(LookupError, match="not now"):
        viacep.fetch(cep("22460901"), gate=_RecordingGate(sandbox, refuse_at_wire=True))
    assert sandbox.served("viacep") == 1
    assert viacep.fetch(cep("22460901"))["cep"] == "22460901"  # the next fetch goes out as ever
    assert sandbox.served("viacep") == 2
