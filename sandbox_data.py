"""Deterministic synthetic data for the sandbox upstream, rendered in each real API's body shape."""

from __future__ import annotations

import hashlib
import time
import unicodedata
from dataclasses import dataclass
from datetime import date, timedelta
from email.utils import formatdate
from typing import Any

# Found whatever their hash says: the examples used in docs, demos and tests.
ALWAYS_FOUND = frozenset(
    {
        "11222333000181",
        "12ABC34501DE35",
        "27865757000102",
        "19131243000197",
        "01310100",
        "22460901",
        "11144477735",
    }
)
NOT_FOUND_ONE_IN = 10
LATEST_STATUS_DATE = date(2025, 12, 31)


@dataclass(frozen=True)
class Municipality:
    """A real municipality with its real CEP range, IBGE code, DDD and centre coordinates."""

    name: str
    uf: str
    ibge: str
    ddd: str
    cep_first: int
    cep_last: int
    latitude: float
    longitude: float


MUNICIPALITIES = (
    Municipality("São Paulo", "SP", "3550308", "11", 1000000, 5999999, -23.5505, -46.6333),
    Municipality("Rio de Janeiro", "RJ", "3304557", "21", 20000000, 23799999, -22.9068, -43.1729),
    Municipality("Belo Horizonte", "MG", "3106200", "31", 30000000, 31999999, -19.9167, -43.9345),
    Municipality("Curitiba", "PR", "4106902", "41", 80000000, 82999999, -25.4284, -49.2733),
    Municipality("Porto Alegre", "RS", "4314902", "51", 90000000, 91999999, -30.0346, -51.2177),
    Municipality("Salvador", "BA", "2927408", "71", 40000000, 42599999, -12.9714, -38.5014),
    Municipality("Recife", "PE", "2611606", "81", 50000000, 52999999, -8.0476, -34.8770),
    Municipality("Fortaleza", "CE", "2304400", "85", 60000000, 61599999, -3.7319, -38.5267),
    Municipality("Brasília", "DF", "5300108", "61", 70000000, 72799999, -15.7939, -47.8828),
    Municipality("Manaus", "AM", "1302603", "92", 69000000, 69099999, -3.1190, -60.0217),
    Municipality("Belém", "PA", "1501402", "91", 66000000, 66999999, -1.4558, -48.4902),
    Municipality("Goiânia", "GO", "5208707", "62", 74000000, 74899999, -16.6869, -49.2648),
    Municipality("Florianópolis", "SC", "4205407", "48", 88000000, 88099999, -27.5954, -48.5480),
    Municipality("Campinas", "SP", "3509502", "19", 13000000, 13139999, -22.9056, -47.0608),
)
STREETS = (
    "Rua das Flores", "Avenida Brasil", "Rua Sete de Setembro", "Rua XV de Novembro", "Avenida Getúlio Vargas",
    "Rua Tiradentes", "Rua Dom Pedro II", "Avenida Santos Dumont", "Rua Barão do Rio Branco",
    "Rua José Bonifácio", "Travessa São João", "Alameda das Acácias",
)  # fmt: skip
NEIGHBOURHOODS = (
    "Centro", "Jardim América", "Vila Nova", "Bela Vista", "Santa Cecília", "Boa Vista", "São José", "Liberdade",
)  # fmt: skip
# Real streets for the always-found CEPs, so demos look like the places they are.
KNOWN_PLACES = {
    "01310100": ("Avenida Paulista", "Bela Vista"),
    "22460901": ("Rua Lopes Quintas", "Jardim Botânico"),
}
STATES = {
    "SP": ("São Paulo", "Sudeste"), "RJ": ("Rio de Janeiro", "Sudeste"), "MG": ("Minas Gerais", "Sudeste"),
    "PR": ("Paraná", "Sul"), "RS": ("Rio Grande do Sul", "Sul"), "SC": ("Santa Catarina", "Sul"),
    "BA": ("Bahia", "Nordeste"), "PE": ("Pernambuco", "Nordeste"), "CE": ("Ceará", "Nordeste"),
    "DF": ("Distrito Federal", "Centro-Oeste"), "GO": ("Goiás", "Centro-Oeste"), "AM": ("Amazonas", "Norte"),
    "PA": ("Pará", "Norte"),
}  # fmt: skip
# (CNAE, description, word used in company names); 0111301 keeps a leading zero on purpose.
ACTIVITIES = (
    ("4711302", "Comércio varejista de mercadorias em geral - supermercados", "SUPERMERCADOS"),
    ("6201501", "Desenvolvimento de programas de computador sob encomenda", "TECNOLOGIA"),
    (
        "4930202",
        "Transporte rodoviário de carga intermunicipal, interestadual e internacional",
        "TRANSPORTES",
    ),
    ("4120400", "Construção de edifícios", "CONSTRUCOES"),
    ("8630503", "Atividade médica ambulatorial restrita a consultas", "SERVICOS MEDICOS"),
    ("7020400", "Atividades de consultoria em gestão empresarial", "CONSULTORIA"),
    ("1412601", "Confecção de peças do vestuário, exceto roupas íntimas", "CONFECCOES"),
    ("5211799", "Depósitos de mercadorias para terceiros", "LOGISTICA"),
    ("8513900", "Ensino fundamental", "EDUCACAO"),
    ("0111301", "Cultivo de arroz", "AGROPECUARIA"),
    ("5611201", "Restaurantes e similares", "RESTAURANTE"),
    ("6204000", "Consultoria em tecnologia da informação", "INFORMATICA"),
)
NAME_WORDS = ("ALFA", "NOVA ERA", "HORIZONTE", "ATLANTICO", "SERRA AZUL", "VALE VERDE", "AURORA", "CRUZEIRO",
              "PIONEIRA", "BOA ESPERANCA", "ESTRELA", "PORTO SEGURO")  # fmt: skip
# (code, description, razão social suffix)
LEGAL_NATURES = (
    ("2062", "Sociedade Empresária Limitada", "LTDA"),
    ("2054", "Sociedade Anônima Fechada", "S.A."),
    ("2135", "Empresário (Individual)", ""),
    ("2240", "Sociedade Simples Limitada", "LTDA"),
)
# (BrasilAPI codigo_porte, BrasilAPI/ReceitaWS text, OpenCNPJ text)
SIZES = ((1, "MICRO EMPRESA", "ME"), (3, "EMPRESA DE PEQUENO PORTE", "EPP"), (5, "DEMAIS", "Demais"))
# (code, text) weighted towards ATIVA as in the real register
STATUSES = ((2, "ATIVA"),) * 16 + ((8, "BAIXADA"), (8, "BAIXADA"), (4, "INAPTA"), (3, "SUSPENSA"))
PARTNER_ROLES = ((49, "Sócio-Administrador"), (22, "Sócio"), (5, "Administrador"), (16, "Presidente"))
FIRST_NAMES = (
    "MARIA",
    "JOSE",
    "ANA",
    "JOAO",
    "FRANCISCA",
    "ANTONIO",
    "LUCAS",
    "JULIANA",
    "CARLOS",
    "FERNANDA",
)
SURNAMES = (
    "SILVA",
    "SANTOS",
    "OLIVEIRA",
    "SOUZA",
    "RODRIGUES",
    "FERREIRA",
    "ALVES",
    "PEREIRA",
    "LIMA",
    "COSTA",
)
COMPLEMENTS = ("", "", "SALA 12", "ANDAR 4", "LOJA 2", "CONJ 31", "BLOCO B")
# The 9th CPF digit is the fiscal region that issued it.
CPF_REGIONS = (
    ("RS",), ("DF", "GO", "MS", "MT", "TO"), ("AC", "AM", "AP", "PA", "RO", "RR"), ("CE", "MA", "PI"),
    ("AL", "PB", "PE", "RN"), ("BA", "SE"), ("MG",), ("ES", "RJ"), ("SP",), ("PR", "SC"),
)  # fmt: skip


def _number(value: str, salt: str) -> int:
    digest = hashlib.sha256(f"{salt}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _pick(value: str, salt: str, options: tuple[Any, ...]) -> Any:
    return options[_number(value, salt) % len(options)]


def is_known(identifier_value: str) -> bool:
    """Whether the sandbox upstreams know this normalized identifier (about 9 in 10 do, stably)."""
    return identifier_value in ALWAYS_FOUND or _number(identifier_value, "known") % NOT_FOUND_ONE_IN != 0


def upper_ascii(text: str) -> str:
    """'São Paulo' -> 'SAO PAULO', as the Receita Federal register spells names."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char)).upper()


@dataclass(frozen=True)
class Place:
    """What the CEP upstreams say about one CEP."""

    cep: str
    street: str
    neighbourhood: str
    municipality: Municipality
    latitude: float
    longitude: float


def municipality_for_cep(cep: str) -> Municipality:
    """The municipality whose real CEP range holds `cep`, or a stable pick for CEPs outside the table."""
    number = int(cep)
    for municipality in MUNICIPALITIES:
        if municipality.cep_first <= number <= municipality.cep_last:
            return municipality
    return _pick(cep, "municipality", MUNICIPALITIES)


def place_for_cep(cep: str) -> Place:
    """The CEP's street, neighbourhood and city; CNPJ bodies use the same function for company addresses."""
    municipality = municipality_for_cep(cep)
    street, neighbourhood = KNOWN_PLACES.get(
        cep, (_pick(cep, "street", STREETS), _pick(cep, "neighbourhood", NEIGHBOURHOODS))
    )
    offset = _number(cep, "location")
    return Place(
        cep=cep,
        street=street,
        neighbourhood=neighbourhood,
        municipality=municipality,
        latitude=round(municipality.latitude + (offset % 2001 - 1000) / 50000, 4),
        longitude=round(municipality.longitude + (offset // 2001 % 2001 - 1000) / 50000, 4),
    )


@dataclass(frozen=True)
class Company:
    """What the CNPJ upstreams say about one CNPJ; each upstream renders it in its own shape."""

    cnpj: str
    razao_social: str
    nome_fantasia: str
    status_code: int
    status: str
    status_date: date
    opened: date
    legal_nature: tuple[str, str, str]
    size: tuple[int, str, str]
    capital_cents: int
    main_activity: tuple[str, str, str]
    other_activities: tuple[tuple[str, str, str], ...]
    place: Place
    number: str
    complement: str
    phone: str
    email: str
    partners: tuple[tuple[str, int, str], ...]

    @property
    def headquarters(self) -> bool:
        """Whether this CNPJ is the head office (branch number 0001) rather than a branch."""
        return self.cnpj[8:12] == "0001"


def _company_cep(cnpj: str) -> str:
    """A CEP inside a real municipality's range that the CEP upstreams know, so cross-checks agree."""
    for attempt in range(100):
        municipality = _pick(cnpj, f"municipality{attempt}", MUNICIPALITIES)
        span = municipality.cep_last - municipality.cep_first + 1
        cep = f"{municipality.cep_first + _number(cnpj, f'cep{attempt}') % span:08d}"
        if is_known(cep):
            return cep
    raise AssertionError("unreachable: nine in ten CEPs are known")


def company_for_cnpj(cnpj: str) -> Company:
    """The synthetic company registered under `cnpj` (a normalized, valid CNPJ)."""
    activity = _pick(cnpj, "activity", ACTIVITIES)
    others = tuple(item for item in ACTIVITIES if item != activity)
    start = _number(cnpj, "others") % len(others)
    count = _number(cnpj, "other-count") % 4
    legal_nature = _pick(cnpj, "nature", LEGAL_NATURES)
    name = f"{_pick(cnpj, 'name', NAME_WORDS)} {activity[2]} {legal_nature[2]}".strip()
    status_code, status = (2, "ATIVA") if cnpj in ALWAYS_FOUND else _pick(cnpj, "status", STATUSES)
    # Alphanumeric CNPJs are only issued from July 2026.
    first_day, days = (date(2026, 7, 1), 120) if not cnpj.isdigit() else (date(1970, 1, 1), 20000)
    opened = first_day + timedelta(days=_number(cnpj, "opened") % days)
    closed = opened + timedelta(days=_number(cnpj, "status-date") % 3000)
    status_date = opened if status == "ATIVA" else max(opened, min(closed, LATEST_STATUS_DATE))
    place = place_for_cep(_company_cep(cnpj))
    partners = tuple(
        (
            f"{_pick(cnpj, f'first{index}', FIRST_NAMES)} {_pick(cnpj, f'middle{index}', SURNAMES)} "
            f"{_pick(cnpj, f'last{index}', SURNAMES)}",
            *_pick(cnpj, f"role{index}", PARTNER_ROLES),
        )
        for index in range(1 + _number(cnpj, "partners") % 3)
    )
    slug = upper_ascii(name.split()[0]).lower()
    return Company(
        cnpj=cnpj,
        razao_social=name,
        nome_fantasia=f"{_pick(cnpj, 'fantasy', NAME_WORDS)} {activity[2]}"
        if _number(cnpj, "has-fantasy") % 5
        else "",
        status_code=status_code,
        status=status,
        status_date=status_date,
        opened=opened,
        legal_nature=legal_nature,
        size=_pick(cnpj, "size", SIZES),
        capital_cents=_pick(cnpj, "capital", (100000, 500000, 1000000, 5000000, 25000000, 100000000))
        + _number(cnpj, "cents") % 100 * (_number(cnpj, "has-cents") % 2),
        main_activity=activity,
        other_activities=tuple(others[(start + step) % len(others)] for step in range(count)),
        place=place,
        number=str(1 + _number(cnpj, "number") % 2500),
        complement=_pick(cnpj, "complement", COMPLEMENTS),
        phone=f"{place.municipality.ddd}{2000_0000 + _number(cnpj, 'phone') % 4000_0000}",
        email=f"contato@{slug}{_number(cnpj, 'mail') % 1000}.com.br" if _number(cnpj, "has-mail") % 2 else "",
        partners=partners,
    )


# ---------------------------------------------------------------------------------------------------------
# Bodies in each upstream's shape (see ../shared/reference/upstream/)


def _masked_cnpj(cnpj: str) -> str:
    return f"{cnpj[:2]}.{cnpj[2:5]}.{cnpj[5:8]}/{cnpj[8:12]}-{cnpj[12:]}"


def _dotted_cnae(code: str) -> str:
    return f"{code[:2]}.{code[2:4]}-{code[4]}-{code[5:]}"


def _masked_partner_cpf(name: str) -> str:
    return f"***{_number(name, 'cpf') % 10**6:06d}**"


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
    updated = date(2025, 1, 1) + timedelta(days=_number(company.cnpj, "updated") % 365)
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
        "service": _pick(place.cep, "service", ("open-cep", "viacep", "correios", "widenet")),
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
    return {"erro": True} if _number(cep, "erro") % 2 else {"erro": "true"}


def brasilapi_cpf(cpf: str) -> dict[str, Any]:
    """GET /api/cpf/v1/{cpf}: validity and the fiscal region (9th digit) with its states."""
    region = int(cpf[8])
    return {
        "cpf": f"{cpf[:3]}.{cpf[3:6]}.{cpf[6:9]}-{cpf[9:]}",
        "isValid": True,
        "rf": region,
        "ufs": list(CPF_REGIONS[region]),
    }


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
