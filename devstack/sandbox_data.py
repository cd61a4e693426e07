"""Deterministic synthetic data for the sandbox upstream: which identifiers exist and what they hold."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from datetime import date, timedelta
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


def stable_number(value: str, salt: str) -> int:
    """A number fixed by `value` and `salt` alone, so every run and process invents the same data."""
    digest = hashlib.sha256(f"{salt}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def stable_pick(value: str, salt: str, options: tuple[Any, ...]) -> Any:
    """One of `options`, always the same one for this value and salt."""
    return options[stable_number(value, salt) % len(options)]


def is_known(identifier_value: str) -> bool:
    """Whether the sandbox upstreams know this normalized identifier (about 9 in 10 do, stably)."""
    return (
        identifier_value in ALWAYS_FOUND or stable_number(identifier_value, "known") % NOT_FOUND_ONE_IN != 0
    )


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
    return stable_pick(cep, "municipality", MUNICIPALITIES)


def place_for_cep(cep: str) -> Place:
    """The CEP's street, neighbourhood and city; CNPJ bodies use the same function for company addresses."""
    municipality = municipality_for_cep(cep)
    street, neighbourhood = KNOWN_PLACES.get(
        cep, (stable_pick(cep, "street", STREETS), stable_pick(cep, "neighbourhood", NEIGHBOURHOODS))
    )
    offset = stable_number(cep, "location")
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
        municipality = stable_pick(cnpj, f"municipality{attempt}", MUNICIPALITIES)
        span = municipality.cep_last - municipality.cep_first + 1
        cep = f"{municipality.cep_first + stable_number(cnpj, f'cep{attempt}') % span:08d}"
        if is_known(cep):
            return cep
    raise AssertionError("unreachable: nine in ten CEPs are known")


def company_for_cnpj(cnpj: str) -> Company:
    """The synthetic company registered under `cnpj` (a normalized, valid CNPJ)."""
    activity = stable_pick(cnpj, "activity", ACTIVITIES)
    others = tuple(item for item in ACTIVITIES if item != activity)
    start = stable_number(cnpj, "others") % len(others)
    count = stable_number(cnpj, "other-count") % 4
    legal_nature = stable_pick(cnpj, "nature", LEGAL_NATURES)
    name = f"{stable_pick(cnpj, 'name', NAME_WORDS)} {activity[2]} {legal_nature[2]}".strip()
    status_code, status = (2, "ATIVA") if cnpj in ALWAYS_FOUND else stable_pick(cnpj, "status", STATUSES)
    # Alphanumeric CNPJs are only issued from July 2026.
    first_day, days = (date(2026, 7, 1), 120) if not cnpj.isdigit() else (date(1970, 1, 1), 20000)
    opened = first_day + timedelta(days=stable_number(cnpj, "opened") % days)
    closed = opened + timedelta(days=stable_number(cnpj, "status-date") % 3000)
    status_date = opened if status == "ATIVA" else max(opened, min(closed, LATEST_STATUS_DATE))
    place = place_for_cep(_company_cep(cnpj))
    partners = tuple(
        (
            f"{stable_pick(cnpj, f'first{index}', FIRST_NAMES)} {stable_pick(cnpj, f'middle{index}', SURNAMES)} "
            f"{stable_pick(cnpj, f'last{index}', SURNAMES)}",
            *stable_pick(cnpj, f"role{index}", PARTNER_ROLES),
        )
        for index in range(1 + stable_number(cnpj, "partners") % 3)
    )
    slug = upper_ascii(name.split()[0]).lower()
    return Company(
        cnpj=cnpj,
        razao_social=name,
        nome_fantasia=f"{stable_pick(cnpj, 'fantasy', NAME_WORDS)} {activity[2]}"
        if stable_number(cnpj, "has-fantasy") % 5
        else "",
        status_code=status_code,
        status=status,
        status_date=status_date,
        opened=opened,
        legal_nature=legal_nature,
        size=stable_pick(cnpj, "size", SIZES),
        capital_cents=stable_pick(cnpj, "capital", (100000, 500000, 1000000, 5000000, 25000000, 100000000))
        + stable_number(cnpj, "cents") % 100 * (stable_number(cnpj, "has-cents") % 2),
        main_activity=activity,
        other_activities=tuple(others[(start + step) % len(others)] for step in range(count)),
        place=place,
        number=str(1 + stable_number(cnpj, "number") % 2500),
        complement=stable_pick(cnpj, "complement", COMPLEMENTS),
        phone=f"{place.municipality.ddd}{2000_0000 + stable_number(cnpj, 'phone') % 4000_0000}",
        email=f"contato@{slug}{stable_number(cnpj, 'mail') % 1000}.com.br"
        if stable_number(cnpj, "has-mail") % 2
        else "",
        partners=partners,
    )
