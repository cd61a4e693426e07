"""The upstream sources: building them from settings and choosing those that serve an identifier.

The `Source` base class and the normalized schemas live in `base`, one subclass per upstream in
`adapters`, the errors a fetch raises in `errors`; the names callers use are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

from enrich.settings import SOURCE_NAMES, Settings
from enrich.sources.adapters import ADAPTERS
from enrich.sources.base import (
    ADDRESS_KEYS,
    CEP_KEYS,
    CNAE_KEYS,
    CNPJ_KEYS,
    MAX_BODY_BYTES,
    PARTNER_KEYS,
    Source,
    default_session,
    identifier_label,
)
from enrich.sources.errors import (
    BadResponse,
    NotFound,
    RateLimited,
    SourceError,
    TransientError,
    UpstreamRejected,
)

__all__ = [
    "ADDRESS_KEYS", "CEP_KEYS", "CNAE_KEYS", "CNPJ_KEYS", "MAX_BODY_BYTES", "PARTNER_KEYS",
    "BadResponse", "NotFound", "RateLimited", "Source", "SourceError", "TransientError", "UpstreamRejected",
    "build_sources", "default_session", "identifier_label", "sources_for",
]  # fmt: skip


def build_sources(settings: Settings) -> dict[str, Source]:
    """Every known source, configured from `settings.sources`, in SOURCE_NAMES order."""
    missing = [name for name in SOURCE_NAMES if name not in settings.sources]
    if missing:
        raise ValueError(
            f"settings have no source settings for {', '.join(missing)}; use Settings.from_env()"
        )
    sources: dict[str, Source] = {}
    for name in SOURCE_NAMES:
        adapter, types = ADAPTERS[name]
        sources[name] = adapter(name=name, types=types, settings=settings.sources[name])
    return sources


def sources_for(identifier_type: str, sources: Mapping[str, Source]) -> list[Source]:
    """The sources that serve this identifier type, in SOURCE_NAMES order (check `supports` per identifier)."""
    kind = str(getattr(identifier_type, "value", identifier_type))  # an IdentifierType or its string
    ordered = sorted(
        sources, key=lambda name: SOURCE_NAMES.index(name) if name in SOURCE_NAMES else len(SOURCE_NAMES)
    )
    return [sources[name] for name in ordered if kind in sources[name].types]
