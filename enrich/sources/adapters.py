"""The upstream adapters (BrasilAPI, ReceitaWS, OpenCNPJ, ViaCEP): their URLs, in-body errors and mapping."""

from __future__ import annotations

from typing import Any

from enrich.identifiers import Identifier
from enrich.sources.base import ADDRESS_KEYS, CEP_KEYS, CNPJ_KEYS, Source, identifier_label
from enrich.sources.errors import BadResponse, NotFound, RateLimited, TransientError, UpstreamRejected
from enrich.sources.upstream_json import (
    JsonReader,
    clean_cep,
    clean_cnae,
    clean_company_size,
    clean_email,
    clean_legal_nature,
    clean_phone,
    clean_qualification,
    clean_uf,
    fold,
    only_digits,
    street_with_type,
    upper_or_none,
)

# ---------------------------------------------------------------------------------------------------------
# Records in the normalized schemas, built the same way by every adapter


def _record(keys: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
    """A dict with exactly `keys`, None where `values` has nothing; a stray key is a programming error."""
    stray = set(values) - set(keys)
    if stray:
        raise KeyError(f"not in the normalized schema: {sorted(stray)}")
    return {key: values.get(key) for key in keys}


def _address(**values: Any) -> dict[str, Any]:
    address = _record(ADDRESS_KEYS, values)
    return address | {"uf": clean_uf(address["uf"]), "cep": clean_cep(address["cep"])}


def _company(**values: Any) -> dict[str, Any]:
    """One company in the normalized CNPJ schema (the same keys whatever the source)."""
    company = _record(CNPJ_KEYS, values)
    return company | {
        "situacao_cadastral": upper_or_none(company["situacao_cadastral"]),
        "natureza_juridica": clean_legal_nature(company["natureza_juridica"]),
        "porte": clean_company_size(company["porte"]),
        "cnaes_secundarios": [cnae for cnae in company["cnaes_secundarios"] or [] if cnae],
        "endereco": company["endereco"] or _address(),
        "email": clean_email(company["email"]),
        "socios": [partner for partner in company["socios"] or [] if partner["nome"]],
    }


def _place(**values: Any) -> dict[str, Any]:
    """One CEP in the normalized CEP schema (the same keys whatever the source)."""
    place = _record(CEP_KEYS, values)
    ibge, ddd = only_digits(place["ibge"]), only_digits(place["ddd"])
    return place | {
        "uf": clean_uf(place["uf"]),
        "ibge": ibge if len(ibge) == 7 else None,
        "ddd": ddd if len(ddd) == 2 else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Adapters


class BrasilAPI(Source):
    """brasilapi.com.br: CNPJ (a minhareceita.org proxy) and CEP v2; errors as HTTP 400/404/500.

    Its CPF endpoint is not used: a CPF is answered from the number alone (cpf_answers.py).
    """

    def _path(self, identifier: Identifier) -> str:
        prefix = {"cnpj": "/api/cnpj/v1/", "cep": "/api/cep/v2/"}[identifier.type.value]
        return prefix + identifier.value

    def _normalize(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        if identifier.type.value == "cnpj":
            return self._company(identifier, reader)
        return self._place(identifier, reader)

    def _company(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        if reader.text("razao_social") is None:
            raise BadResponse(f"{self.name}: CNPJ body has no razao_social")
        return _company(
            cnpj=self._same_identifier(identifier, reader.text("cnpj"), 14),
            razao_social=reader.text("razao_social"),
            nome_fantasia=reader.text("nome_fantasia"),
            situacao_cadastral=reader.text("descricao_situacao_cadastral"),
            data_situacao_cadastral=reader.date("data_situacao_cadastral"),
            data_abertura=reader.date("data_inicio_atividade"),
            natureza_juridica=reader.text("natureza_juridica"),
            porte=reader.text("porte") or reader.text("descricao_porte"),
            capital_social=reader.money("capital_social"),
            cnae_principal=clean_cnae(reader.text("cnae_fiscal"), reader.text("cnae_fiscal_descricao")),
            cnaes_secundarios=[
                clean_cnae(item.text("codigo"), item.text("descricao"))
                for item in reader.objects("cnaes_secundarios")
            ],
            endereco=_address(
                logradouro=street_with_type(
                    reader.text("descricao_tipo_de_logradouro"), reader.text("logradouro")
                ),
                numero=reader.text("numero"),
                complemento=reader.text("complemento"),
                bairro=reader.text("bairro"),
                municipio=reader.text("municipio"),
                uf=reader.text("uf"),
                cep=reader.text("cep"),
            ),
            telefone=clean_phone(reader.text("ddd_telefone_1")) or clean_phone(reader.text("ddd_telefone_2")),
            email=reader.text("email"),
            socios=[
                {"nome": partner.text("nome_socio"), "qualificacao": partner.text("qualificacao_socio")}
                for partner in reader.objects("qsa")
            ],
        )

    def _place(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        if reader.text("city") is None:
            raise BadResponse(f"{self.name}: CEP body has no city")
        # The IBGE code is {"city", "state"} in some answers and a bare string in others.
        ibge = reader.object("ibge") if isinstance(reader.raw("ibge"), dict) else None
        location = reader.object("location")
        coordinates = location.object("coordinates") if location else None
        return _place(
            cep=self._same_identifier(identifier, reader.text("cep"), 8),
            logradouro=reader.text("street"),
            bairro=reader.text("neighborhood"),
            municipio=reader.text("city"),
            uf=reader.text("state"),
            ibge=ibge.text("city") if ibge else reader.text("ibge"),
            latitude=coordinates.money("latitude") if coordinates else None,
            longitude=coordinates.money("longitude") if coordinates else None,
        )


_RECEITAWS_REJECTED = ("invalido", "invalid")
_RECEITAWS_NOT_FOUND = (
    "nao encontrad",
    "not found",
    "rejeitado",
    "nao existe",
    "inexistente",
    "nao ha registro",
)
_RECEITAWS_RATE_LIMITED = ("too many", "muitas requisicoes", "limite")


class ReceitaWS(Source):
    """receitaws.com.br: numeric CNPJs only; errors inside HTTP 200 as {"status": "ERROR", "message"}."""

    def supports(self, identifier: Identifier) -> bool:
        """Only numeric CNPJs: ReceitaWS predates the alphanumeric CNPJ and rejects it."""
        return super().supports(identifier) and identifier.value.isdigit()

    def _path(self, identifier: Identifier) -> str:
        return f"/v1/cnpj/{identifier.value}"

    def _check_body(self, identifier: Identifier, data: dict[str, Any], status: int) -> None:
        state = data.get("status")
        if state == "OK" or (state is None and "nome" in data):
            return
        if state != "ERROR":
            raise BadResponse(
                f"{self.name}: unexpected status {state!r} in the body for {identifier_label(identifier)}"
            )
        message = data.get("message")
        message = message.strip() if isinstance(message, str) and message.strip() else "no message"
        what = f"{self.name}: {identifier_label(identifier)}"
        folded = fold(message)
        if any(word in folded for word in _RECEITAWS_REJECTED):
            raise UpstreamRejected(f"{what} rejected by the upstream: {message}", status)
        if any(word in folded for word in _RECEITAWS_NOT_FOUND):
            raise NotFound(f"{what} not found: {message}", status)
        if any(word in folded for word in _RECEITAWS_RATE_LIMITED):
            raise RateLimited(f"{what}: rate limited: {message}", status)
        raise TransientError(f"{what}: upstream error: {message}", status)

    def _normalize(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        if reader.text("nome") is None:
            raise BadResponse(f"{self.name}: CNPJ body has no nome")
        main = reader.objects("atividade_principal")
        return _company(
            cnpj=self._same_identifier(identifier, reader.text("cnpj"), 14),
            razao_social=reader.text("nome"),
            nome_fantasia=reader.text("fantasia"),
            situacao_cadastral=reader.text("situacao"),
            data_situacao_cadastral=reader.date("data_situacao"),
            data_abertura=reader.date("abertura"),
            natureza_juridica=reader.text("natureza_juridica"),
            porte=reader.text("porte"),
            capital_social=reader.money("capital_social"),
            cnae_principal=clean_cnae(main[0].text("code"), main[0].text("text")) if main else None,
            cnaes_secundarios=[
                clean_cnae(item.text("code"), item.text("text"))
                for item in reader.objects("atividades_secundarias")
            ],
            endereco=_address(
                logradouro=reader.text("logradouro"),
                numero=reader.text("numero"),
                complemento=reader.text("complemento"),
                bairro=reader.text("bairro"),
                municipio=reader.text("municipio"),
                uf=reader.text("uf"),
                cep=reader.text("cep"),
            ),
            telefone=clean_phone(reader.text("telefone")),
            email=reader.text("email"),
            socios=[
                {"nome": partner.text("nome"), "qualificacao": clean_qualification(partner.text("qual"))}
                for partner in reader.objects("qsa")
            ],
        )


class OpenCNPJ(Source):
    """api.opencnpj.org: CNPJ (numeric and alphanumeric); errors as HTTP 400/404 {"error": ...}."""

    def _path(self, identifier: Identifier) -> str:
        return f"/{identifier.value}"

    def _normalize(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        if reader.text("razao_social") is None:
            raise BadResponse(f"{self.name}: CNPJ body has no razao_social")
        # Newer answers list every CNAE with its description in "cnaes"; older ones give bare codes.
        descriptions = {
            only_digits(item.text("codigo")).zfill(7): item.text("descricao")
            for item in reader.objects("cnaes")
        }
        main_code = reader.text("cnae_principal")
        phones = [phone for phone in reader.objects("telefones") if not phone.boolean("is_fax")]
        phone = f"{phones[0].text('ddd') or ''}{phones[0].text('numero') or ''}" if phones else None
        return _company(
            cnpj=self._same_identifier(identifier, reader.text("cnpj"), 14),
            razao_social=reader.text("razao_social"),
            nome_fantasia=reader.text("nome_fantasia"),
            situacao_cadastral=reader.text("situacao_cadastral"),
            data_situacao_cadastral=reader.date("data_situacao_cadastral"),
            data_abertura=reader.date("data_inicio_atividade"),
            natureza_juridica=reader.text("natureza_juridica"),
            porte=reader.text("porte_empresa"),
            capital_social=reader.money("capital_social"),
            cnae_principal=clean_cnae(main_code, descriptions.get(only_digits(main_code).zfill(7))),
            cnaes_secundarios=[
                clean_cnae(code, descriptions.get(only_digits(code).zfill(7)))
                for code in reader.texts("cnaes_secundarios")
            ],
            endereco=_address(
                logradouro=street_with_type(reader.text("tipo_logradouro"), reader.text("logradouro")),
                numero=reader.text("numero"),
                complemento=reader.text("complemento"),
                bairro=reader.text("bairro"),
                municipio=reader.text("municipio"),
                uf=reader.text("uf"),
                cep=reader.text("cep"),
            ),
            telefone=clean_phone(phone),
            email=reader.text("email"),
            socios=[
                {"nome": partner.text("nome_socio"), "qualificacao": partner.text("qualificacao_socio")}
                for partner in reader.objects("QSA")
            ],
        )


class ViaCEP(Source):
    """viacep.com.br: CEP; an unknown CEP is HTTP 200 with "erro": true (or "true")."""

    def _path(self, identifier: Identifier) -> str:
        return f"/ws/{identifier.value}/json/"

    def _check_body(self, identifier: Identifier, data: dict[str, Any], status: int) -> None:
        error = data.get("erro")
        if error is True or (isinstance(error, str) and error.strip().lower() == "true"):
            raise NotFound(
                f'{self.name}: {identifier_label(identifier)} not found ("erro": {error!r})', status
            )

    def _normalize(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        if reader.text("localidade") is None:
            raise BadResponse(f"{self.name}: CEP body has no localidade")
        return _place(
            cep=self._same_identifier(identifier, reader.text("cep"), 8),
            logradouro=reader.text("logradouro"),
            complemento=reader.text("complemento"),
            bairro=reader.text("bairro"),
            municipio=reader.text("localidade"),
            uf=reader.text("uf"),
            ibge=reader.text("ibge"),
            ddd=reader.text("ddd"),
        )


# The adapter behind each source name in SOURCE_NAMES, and the identifier types that upstream serves.
ADAPTERS: dict[str, tuple[type[Source], tuple[str, ...]]] = {
    "brasilapi": (BrasilAPI, ("cnpj", "cep")),
    "receitaws": (ReceitaWS, ("cnpj",)),
    "opencnpj": (OpenCNPJ, ("cnpj",)),
    "viacep": (ViaCEP, ("cep",)),
}
