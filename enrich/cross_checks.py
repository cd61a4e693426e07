"""Merging the sources of a lookup into one result, and the cross-checks run on it."""

from __future__ import annotations

import unicodedata
from typing import Any

from enrich.lookups import SourceResult, SourceState

# Which source wins a field when several answer: the most complete first.
SOURCE_PREFERENCE = ("brasilapi", "opencnpj", "receitaws", "viacep")
AGREEMENT_FIELDS = {
    "cnpj": ("razao_social", "situacao_cadastral", "endereco.cep", "endereco.uf"),
    "cep": ("municipio", "uf"),
    "cpf": (),
}


def _fold(value: Any) -> Any:
    """Compare text without case, accents or extra spaces ("São Paulo" == "SAO PAULO")."""
    if not isinstance(value, str):
        return value
    text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    return " ".join(text.upper().split())


def _get(data: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _answers(results: dict[str, SourceResult]) -> list[tuple[str, dict]]:
    usable = [
        (name, r.data)
        for name, r in results.items()
        if r.state in (SourceState.OK, SourceState.STALE) and r.data
    ]
    return sorted(
        usable,
        key=lambda item: (
            SOURCE_PREFERENCE.index(item[0]) if item[0] in SOURCE_PREFERENCE else len(SOURCE_PREFERENCE)
        ),
    )


def _merge_dicts(preferred: dict, other: dict) -> dict:
    """Fill the preferred answer's missing (None/empty) values from another answer, recursively."""
    merged = dict(preferred)
    for key, value in other.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = _merge_dicts(current, value)
        elif current in (None, "", [], {}):
            merged[key] = value
    return merged


def merge(identifier_type: str, results: dict[str, SourceResult]) -> dict | None:
    """One record from every usable answer, the preferred source first; None if nobody answered."""
    answers = _answers(results)
    if not answers:
        return None
    merged = answers[0][1]
    for _, data in answers[1:]:
        merged = _merge_dicts(merged, data)
    return merged


def _check(name: str, status: str, detail: str, code: str, **params: Any) -> dict:
    """A check result; `code` and `params` let a page phrase `detail` in its reader's language."""
    return {"name": name, "status": status, "detail": detail, "code": code, "params": params}


def agreement_checks(identifier_type: str, results: dict[str, SourceResult]) -> list[dict]:
    """Do the sources that answered agree on the fields that matter?"""
    answers = _answers(results)
    checks = []
    for path in AGREEMENT_FIELDS.get(identifier_type, ()):
        values = {name: _get(data, path) for name, data in answers if _get(data, path) not in (None, "")}
        if len(values) < 2:
            checks.append(
                _check(
                    f"sources_agree:{path}",
                    "unverified",
                    "fewer than two sources answered this field",
                    "too_few_answers",
                )
            )
            continue
        distinct = {_fold(v) for v in values.values()}
        if len(distinct) == 1:
            checks.append(
                _check(
                    f"sources_agree:{path}",
                    "pass",
                    f"{len(values)} sources agree",
                    "sources_agree",
                    count=len(values),
                )
            )
        else:
            detail = "; ".join(f"{name}={value!r}" for name, value in values.items())
            checks.append(
                _check(
                    f"sources_agree:{path}",
                    "fail",
                    f"sources disagree: {detail}",
                    "sources_disagree",
                    values=detail,
                )
            )
    return checks


def company_checks(merged: dict | None, cep_data: dict | None, cep_error: str | None) -> list[dict]:
    """CNPJ checks: is the company active, and does its CEP exist in the company's city/state?"""
    if merged is None:
        return [_check("active", "unverified", "no source returned the company", "no_company")]
    situacao = merged.get("situacao_cadastral")
    checks = [
        _check(
            "active",
            "pass" if _fold(situacao) == "ATIVA" else "fail",
            f"situação cadastral is {situacao or 'unknown'}",
            "situacao_is",
            situacao=situacao or "?",
        )
    ]
    address = merged.get("endereco") or {}
    cep = address.get("cep")
    if not cep:
        return checks + [_check("cep_valid", "unverified", "the company has no CEP on record", "no_cep")]
    if cep_data is None:
        status = "fail" if cep_error == "not_found" else "unverified"
        if status == "fail":
            return checks + [
                _check("cep_valid", status, f"CEP {cep} was not found", "cep_not_found", cep=cep)
            ]
        return checks + [
            _check(
                "cep_valid",
                status,
                f"CEP {cep} could not be checked: {cep_error}",
                "cep_unchecked",
                cep=cep,
                reason=cep_error,
            )
        ]
    checks.append(_check("cep_valid", "pass", f"CEP {cep} exists", "cep_exists", cep=cep))
    company = (_fold(address.get("municipio")), _fold(address.get("uf")))
    postal = (_fold(cep_data.get("municipio")), _fold(cep_data.get("uf")))
    matches = company == postal
    checks.append(
        _check(
            "cep_matches_city",
            "pass" if matches else "fail",
            f"CEP {cep} is in {cep_data.get('municipio')}/{cep_data.get('uf')}; "
            f"the company's address says {address.get('municipio')}/{address.get('uf')}",
            "cep_city",
            cep=cep,
            cep_city=f"{cep_data.get('municipio')}/{cep_data.get('uf')}",
            company_city=f"{address.get('municipio')}/{address.get('uf')}",
        )
    )
    return checks
