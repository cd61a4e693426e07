"""The sandbox's answers in each real upstream API's body shape, rendered from its synthetic data."""

from __future__ import annotations

import time
from datetime import date, timedelta
from email.utils import formatdate
from typing import Any

from devstack.sandbox_data import STATES, Company, Place, stable_number, stable_pick, upper_ascii

# The real bodies these follow are in ../shared/reference/upstream/.


def _masked_cnpj(cnpj: str) -> str:
    return f"{cnpj[:2]}.{cnpj[2:5]}.{cnpj[5:8]}/{cnpj[8:12]}-{cnpj[12:]}"


def _dotted_cnae(code: str) -> str:
    return f"{code[:2]}.{code[2:4]}-{code[4]}-{code[5:]}"


def _masked_partner_cpf(name: str) -> str:
    return f"***{stable_number(name, 'cpf') % 10**6:06d}**"


def _amount(cents: int, point: str = ".") -> str:
    return f"{cents // 100}{point}{cents % 100:02d}"


def _split_street(street: str) -> tuple[str, str]:
    kind, _, name = upper_ascii(street).partition(" ")
    return kind, name


# Fields of the real shape that the sandbox has nothing to say about, so every key of the real body is there.
_BRASILAPI_PARTNER_FILLERS = {
    "codigo_pais": None,
    "codigo_faixa_etaria": 5,
    "cpf_representante_legal": "***000000**",
    "nome_representante_legal": "",
    "qualificacao_representante_legal": "Não informada",
    "codigo_qualificacao_representante_legal": 0,
}
_BRASILAPI_CNPJ_FILLERS = {
    "pais": None,
    "codigo_pais": None,
    "codigo_municipio": None,
    "opcao_pelo_mei": False,
    "opcao_pelo_simples": False,
    "data_opcao_pelo_mei": None,
    "data_exclusao_do_mei": None,
    "data_opcao_pelo_simples": None,
    "data_exclusao_do_simples": None,
    "data_situacao_especial": None,
    "regime_tributario": [],
    "nome_cidade_no_exterior": "",
    "motivo_situacao_cadastral": 0,
    "descricao_motivo_situacao_cadastral": "SEM MOTIVO",
    "ente_federativo_responsavel": "",
    "qualificacao_do_responsavel": 49,
}
_RECEITAWS_REGIMES = {
    "simples": {"optante": False, "data_opcao": None, "data_exclusao": None},
    "simei": {"optante": False, "data_opcao": None, "data_exclusao": None},
}


def brasilapi_cnpj(company: Company) -> dict[str, Any]:
    """GET /api/cnpj/v1/{cnpj} (the minhareceita.org shape)."""
    place, municipality = company.place, company.place.municipality
    street_kind, street_name = _split_street(place.street)
    capital = company.capital_cents / 100
    return {
        "uf": municipality.uf,
        "cep": place.cep,
        "qsa": [
            {
                "pais": None,
                "nome_socio": name,
                "faixa_etaria": "Entre 41 a 50 anos",
                "cnpj_cpf_do_socio": _masked_partner_cpf(name),
                "qualificacao_socio": role,
                "codigo_qualificacao_socio": role_code,
                "data_entrada_sociedade": company.opened.isoformat(),
                "identificador_de_socio": 2,
                **_BRASILAPI_PARTNER_FILLERS,
            }
            for name, role_code, role in company.partners
        ],
        "cnpj": company.cnpj,
        "email": company.email or None,
        "porte": company.size[1],
        "bairro": upper_ascii(place.neighbourhood),
        "numero": company.number,
        "ddd_fax": "",
        "municipio": upper_ascii(municipality.name),
        "logradouro": street_name,
        "cnae_fiscal": int(company.main_activity[0]),
        "complemento": company.complement,
        "codigo_porte": company.size[0],
        "razao_social": company.razao_social,
        "nome_fantasia": company.nome_fantasia,
        "capital_social": int(capital) if capital.is_integer() else capital,
        "ddd_telefone_1": company.phone,
        "ddd_telefone_2": "",
        "descricao_porte": "",
        "cnaes_secundarios": [
            {"codigo": int(code), "descricao": text} for code, text, _ in company.other_activities
        ]
        or [{"codigo": 0, "descricao": ""}],
        "natureza_juridica": company.legal_nature[1],
        "situacao_especial": "",
        "situacao_cadastral": company.status_code,
        "cnae_fiscal_descricao": company.main_activity[1],
        "codigo_municipio_ibge": int(municipality.ibge),
        "data_inicio_atividade": company.opened.isoformat(),
        "data_situacao_cadastral": company.status_date.isoformat(),
        "codigo_natureza_juridica": int(company.legal_nature[0]),
        "identificador_matriz_filial": 1 if company.headquarters else 2,
        "descricao_situacao_cadastral": company.status,
        "descricao_tipo_de_logradouro": street_kind,
        "descricao_identificador_matriz_filial": "MATRIZ" if company.headquarters else "FILIAL",
        **_BRASILAPI_CNPJ_FILLERS,
    }


def receitaws_cnpj(company: Company) -> dict[str, Any]:
    """GET /v1/cnpj/{cnpj}: dd/mm/yyyy dates, masked CNPJ and CEP, capital as a string."""
    place, municipality = company.place, company.place.municipality
    code, nature, _ = company.legal_nature
    phone = company.phone
    updated = date(2025, 1, 1) + timedelta(days=stable_number(company.cnpj, "updated") % 365)
    return {
        "abertura": company.opened.strftime("%d/%m/%Y"),
        "situacao": company.status,
        "tipo": "MATRIZ" if company.headquarters else "FILIAL",
        "nome": company.razao_social,
        "fantasia": company.nome_fantasia,
        "porte": company.size[1],
        "natureza_juridica": f"{code[:3]}-{code[3]} - {nature}",
        "atividade_principal": [
            {"code": _dotted_cnae(company.main_activity[0]), "text": company.main_activity[1]}
        ],
        "atividades_secundarias": [
            {"code": _dotted_cnae(code), "text": text} for code, text, _ in company.other_activities
        ]
        or [{"code": "00.00-0-00", "text": "Não informada"}],
        "qsa": [{"nome": name, "qual": f"{role_code}-{role}"} for name, role_code, role in company.partners],
        "logradouro": upper_ascii(place.street),
        "numero": company.number,
        "municipio": upper_ascii(municipality.name),
        "bairro": upper_ascii(place.neighbourhood),
        "uf": municipality.uf,
        "cep": f"{place.cep[:2]}.{place.cep[2:5]}-{place.cep[5:]}",
        "telefone": f"({phone[:2]}) {phone[2:6]}-{phone[6:]}",
        "data_situacao": company.status_date.strftime("%d/%m/%Y"),
        "cnpj": _masked_cnpj(company.cnpj),
        "ultima_atualizacao": f"{updated.isoformat()}T03:00:00.000Z",
        "status": "OK",
        "complemento": company.complement,
        "email": company.email,
        "efr": "",
        "motivo_situacao": "",
        "situacao_especial": "",
        "data_situacao_especial": "",
        "capital_social": _amount(company.capital_cents),
        **{
            name: regime | {"ultima_atualizacao": f"{updated.isoformat()}T03:00:00.000Z"}
            for name, regime in _RECEITAWS_REGIMES.items()
        },
        "extra": {},
        "billing": {"free": True, "database": True},
    }


def opencnpj_cnpj(company: Company) -> dict[str, Any]:
    """GET /{cnpj}: title-case situação, capital with a decimal comma, phones as a list."""
    place, municipality = company.place, company.place.municipality
    return {
        "cnpj": company.cnpj,
        "razao_social": company.razao_social,
        "nome_fantasia": company.nome_fantasia,
        "situacao_cadastral": company.status.title(),
        "data_situacao_cadastral": company.status_date.isoformat(),
        "matriz_filial": "Matriz" if company.headquarters else "Filial",
        "data_inicio_atividade": company.opened.isoformat(),
        "cnae_principal": company.main_activity[0],
        "cnaes_secundarios": [code for code, _, _ in company.other_activities],
        "cnaes_secundarios_count": len(company.other_activities),
        "natureza_juridica": company.legal_nature[1],
        "logradouro": upper_ascii(place.street),
        "numero": company.number,
        "complemento": company.complement,
        "bairro": upper_ascii(place.neighbourhood),
        "cep": place.cep,
        "uf": municipality.uf,
        "municipio": upper_ascii(municipality.name),
        "email": company.email,
        "telefones": [{"ddd": company.phone[:2], "numero": company.phone[2:], "is_fax": False}],
        "capital_social": _amount(company.capital_cents, ","),
        "porte_empresa": company.size[2],
        "opcao_simples": "N",
        "data_opcao_simples": None,
        "opcao_mei": "N",
        "data_opcao_mei": None,
        "QSA": [
            {
                "nome_socio": name,
                "cnpj_cpf_socio": _masked_partner_cpf(name),
                "qualificacao_socio": role,
                "data_entrada_sociedade": company.opened.isoformat(),
                "identificador_socio": "Pessoa Física",
                "faixa_etaria": "Entre 41 a 50 anos",
            }
            for name, _, role in company.partners
        ],
    }


def brasilapi_cep(place: Place) -> dict[str, Any]:
    """GET /api/cep/v2/{cep}."""
    municipality = place.municipality
    return {
        "cep": place.cep,
        "state": municipality.uf,
        "city": municipality.name,
        "neighborhood": place.neighbourhood,
        "street": place.street,
        "service": stable_pick(place.cep, "service", ("open-cep", "viacep", "correios", "widenet")),
        "ibge": {"city": municipality.ibge, "state": municipality.ibge[:2]},
        "timezoneName": "America/Sao_Paulo",
        "location": {
            "type": "Point",
            "coordinates": {"longitude": f"{place.longitude:.4f}", "latitude": f"{place.latitude:.4f}"},
        },
    }


def viacep_cep(place: Place) -> dict[str, Any]:
    """GET /ws/{cep}/json/."""
    municipality = place.municipality
    state, region = STATES[municipality.uf]
    return {
        "cep": f"{place.cep[:5]}-{place.cep[5:]}",
        "logradouro": place.street,
        "complemento": "",
        "unidade": "",
        "bairro": place.neighbourhood,
        "localidade": municipality.name,
        "uf": municipality.uf,
        "estado": state,
        "regiao": region,
        "ibge": municipality.ibge,
        "gia": "",
        "ddd": municipality.ddd,
        "siafi": "",
    }


def viacep_not_found(cep: str) -> dict[str, Any]:
    """ViaCEP's unknown-CEP body; both forms seen in the wild, each CEP always the same one."""
    return {"erro": True} if stable_number(cep, "erro") % 2 else {"erro": "true"}


def brasilapi_invalid(kind: str, value: str) -> dict[str, Any]:
    """BrasilAPI's HTTP 400 body for a malformed CNPJ or CPF."""
    return {"message": f"{kind} {value} inválido.", "name": "BadRequestError", "type": "bad_request"}


def brasilapi_not_found(kind: str, masked: str) -> dict[str, Any]:
    """BrasilAPI's HTTP 404 body for an unknown CNPJ or CPF."""
    return {"message": f"{kind} {masked} não encontrado.", "name": "NotFoundError", "type": "not_found"}


def brasilapi_route_not_found() -> dict[str, Any]:
    """BrasilAPI's HTTP 404 body for a path it does not serve."""
    return {"message": "Page not found.", "type": "not_found", "name": "NotFoundError"}


def brasilapi_cep_invalid() -> dict[str, Any]:
    """BrasilAPI's HTTP 400 body for a malformed CEP."""
    return {
        "name": "CepPromiseError",
        "message": "CEP deve conter exatamente 8 caracteres.",
        "type": "validation_error",
        "errors": [{"message": "CEP informado não possui 8 caracteres.", "service": "cep_validation"}],
    }


def brasilapi_cep_not_found() -> dict[str, Any]:
    """BrasilAPI's HTTP 404 body for an unknown CEP: every CEP service it asked failed."""
    return {
        "name": "CepPromiseError",
        "message": "Todos os serviços de CEP retornaram erro.",
        "type": "service_error",
        "errors": [
            {"name": "ServiceError", "message": "CEP não encontrado na base do ViaCEP.", "service": "viacep"},
            {"name": "ServiceError", "message": "CEP não encontrado", "service": "widenet"},
        ],
    }


def brasilapi_internal_error() -> dict[str, Any]:
    """BrasilAPI's HTTP 500 body, which it sends for any upstream failure other than 400/404."""
    return {"name": "InternalError", "message": "Erro interno no servidor.", "type": "internal_error"}


def quota_exceeded(quota: int, retry_after: int) -> dict[str, Any]:
    """An HTTP 429 body in publica.cnpj.ws's words (a 3-a-minute free tier, like ReceitaWS)."""
    release = formatdate(time.time() + retry_after, usegmt=True)
    return {
        "status": 429,
        "titulo": "Muitas requisições",
        "detalhes": f"Excedido o limite máximo de {quota} consultas por minuto. Liberação ocorrerá em {release}",
        "validacao": [],
    }
