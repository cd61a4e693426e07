"""A CPF answered from the number alone, in the process that validated it: nothing stored, nothing sent.

A CPF is a person's (LGPD personal data).  Everything a public source says about one, its check
digits and the fiscal region that issued it (its ninth digit) with that region's states, follows
from the number itself.  So a CPF lookup calls no upstream, writes no cache entry, lookup record,
task or event log, and leaves nothing in Redis that contains the number: there is nothing to
leak and no oracle for "was this CPF looked up today".  Logs show it masked (log_redaction).
"""

from __future__ import annotations

import re
import time
from typing import Any

from enrich.identifiers import Identifier, IdentifierType
from enrich.lookups import Lookup, LookupStatus

# The 9th CPF digit is the fiscal region (Receita Federal) that issued it, and these its states.
CPF_REGIONS: tuple[tuple[str, ...], ...] = (
    ("RS",), ("DF", "GO", "MS", "MT", "TO"), ("AC", "AM", "AP", "PA", "RO", "RR"), ("CE", "MA", "PI"),
    ("AL", "PB", "PE", "RN"), ("BA", "SE"), ("MG",), ("ES", "RJ"), ("SP",), ("PR", "SC"),
)  # fmt: skip


def facts(identifier: Identifier) -> dict[str, Any]:
    """What the number says about itself: printed form, valid (parse() checked the digits), region, states."""
    if identifier.type is not IdentifierType.CPF:
        raise ValueError("not a CPF")
    region = int(identifier.value[8])
    return {
        "cpf": identifier.masked(),
        "valido": True,
        "regiao_fiscal": region,
        "ufs": list(CPF_REGIONS[region]),
    }


def checks() -> list[dict[str, Any]]:
    """The one check a CPF gets: its check digits (parse() already refused a CPF whose digits fail)."""
    return [
        {
            "name": "check_digits",
            "status": "pass",
            "detail": "the CPF's check digits match",
            "code": "cpf_check_digits_match",
            "params": {},
        }
    ]


def answer(identifier: Identifier, priority: int) -> Lookup:
    """The complete lookup of a CPF: no id (there is no record to read back), no sources."""
    now = time.time()
    return Lookup(
        id="",
        type=str(identifier.type),
        identifier=identifier.value,
        priority=priority,
        status=LookupStatus.COMPLETE,
        created_at=now,
        deadline_at=now,
        sources={},
        result={"data": facts(identifier), "checks": checks()},
        completed_at=now,
    )


def masked(value: str) -> str:
    """A CPF as a batch keeps it: `***.***.***-35`, its check digits alone.

    Fewer digits than logs show (`111******35`): a batch row also shows the fiscal region, the
    ninth digit, and the first three with it would narrow the number to about a thousand.
    """
    digits = "".join(char for char in value if char.isdigit())
    return f"***.***.***-{digits[-2:]}" if len(digits) == 11 else "***.***.***-**"


# A run of digits as people write them (dots, dashes, slashes, spaces between).
_DIGIT_RUN = re.compile(r"\d(?:[\d./ -]*\d)?")
CNPJ_DIGITS = 14


def mask_digit_runs(text: str) -> str:
    """`text` with every run of nine or more digits shown as `*` but its last two, separators kept.

    For what a batch keeps of the lines it could not read (value and reason) and its name: a CPF
    with a typo, a stray prefix or in the wrong column is still a person's number.  A run of exactly
    14 digits (a numeric CNPJ, public registry data) is kept; a CEP has eight.
    """

    def mask(match: re.Match) -> str:
        run = match.group(0)
        total = sum(char.isdigit() for char in run)
        if total < 9 or total == CNPJ_DIGITS:
            return run
        seen, shown = 0, []
        for char in run:
            if char.isdigit():
                seen += 1
                char = char if seen > total - 2 else "*"
            shown.append(char)
        return "".join(shown)

    return _DIGIT_RUN.sub(mask, text)
