"""The source interface: the normalized schemas, the `Source` base class with its HTTP fetch and error mapping."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import requests
import urllib3
import urllib3.connection
from requests.adapters import HTTPAdapter
from urllib3.exceptions import DecodeError, HTTPError, ProtocolError, ReadTimeoutError

from enrich.identifiers import Identifier
from enrich.settings import SOURCE_NAMES, SourceSettings
from enrich.sources.errors import (
    BadResponse,
    NotFound,
    RateLimited,
    TransientError,
    UpstreamRejected,
)
from enrich.sources.upstream_json import JsonReader, error_detail, json_object, only_alphanumeric

__all__ = [
    "ADDRESS_KEYS", "CEP_KEYS", "CNAE_KEYS", "CNPJ_KEYS", "MAX_BODY_BYTES", "PARTNER_KEYS",
    "GatedAdapter", "SendGate", "Source", "default_session", "identifier_label",
]  # fmt: skip

# ---------------------------------------------------------------------------------------------------------
# Normalized schemas: every source of a type returns exactly these keys (None where it has no value).

CNPJ_KEYS = (
    "cnpj", "razao_social", "nome_fantasia", "situacao_cadastral", "data_situacao_cadastral", "data_abertura",
    "natureza_juridica", "porte", "capital_social", "cnae_principal", "cnaes_secundarios", "endereco",
    "telefone", "email", "socios",
)  # fmt: skip
ADDRESS_KEYS = ("logradouro", "numero", "complemento", "bairro", "municipio", "uf", "cep")
CNAE_KEYS = ("codigo", "descricao")
PARTNER_KEYS = ("nome", "qualificacao")
CEP_KEYS = (
    "cep", "logradouro", "complemento", "bairro", "municipio", "uf", "ibge", "ddd", "latitude", "longitude",
)  # fmt: skip


# A lookup answer is a few KB; anything past this is a broken or hostile upstream, not data.
MAX_BODY_BYTES = 2 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
USER_AGENT = "enrichment-lookup/0.1 (+https://github.com/enrichment-lookup; python-requests)"

_session: requests.Session | None = None
_session_pid: int | None = None
_session_lock = threading.Lock()


class SendGate(Protocol):
    """What a fetch lets decide when its request goes out (the rate limiter's send slot); either
    step may wait, or raise to end the fetch with no request made."""

    def before_send(self) -> None:
        """The request is built: the slow part (a round trip, a sleep), before any connection is used."""

    def at_wire(self) -> None:
        """The connection is open and the request's first byte is about to be written."""


_wire = threading.local()  # the gate of the request this thread is sending, until its first write


class _GatedSend:
    """A connection that calls its thread's pending gate right before the first write of a request,
    after connecting: nothing but the write itself comes after the gate's last look at the clock."""

    def send(self, data: Any) -> None:
        gate, _wire.gate = getattr(_wire, "gate", None), None
        if gate is None or not isinstance(data, bytes):
            super().send(data)  # type: ignore[misc]
            return
        if self.sock is None:  # type: ignore[attr-defined]  (the connection's own)
            self.connect()  # type: ignore[attr-defined]
        sys.audit("http.client.send", self, data)
        gate.at_wire()
        self.sock.sendall(data)  # type: ignore[attr-defined]  (http.client's send of bytes, nothing between)


class _GatedHTTPConnection(_GatedSend, urllib3.connection.HTTPConnection):
    pass


class _GatedHTTPSConnection(_GatedSend, urllib3.connection.HTTPSConnection):
    pass


class _GatedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GatedHTTPConnection


class _GatedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _GatedHTTPSConnection


class GatedAdapter(HTTPAdapter):
    """requests' adapter whose connections call a fetch's `SendGate.at_wire` right before writing."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GatedHTTPPool, "https": _GatedHTTPSPool}


@contextlib.contextmanager
def _gated(gate: SendGate | None, http: requests.Session, url: str) -> Iterator[None]:
    """While sending `url` on `http`: the gate's last step right before the first write when the
    session's connections know how, else now."""
    if gate is None:
        yield
        return
    if not isinstance(http.get_adapter(url), GatedAdapter):
        gate.at_wire()
        yield
        return
    _wire.gate = gate
    try:
        yield
    finally:
        _wire.gate = None


def default_session() -> requests.Session:
    """The process's shared HTTP session (keep-alive connection reuse), with the service's User-Agent."""
    global _session, _session_pid
    with _session_lock:
        # A pool inherited through fork() would share sockets with the parent, so each process builds its own.
        if _session is None or _session_pid != os.getpid():
            session = requests.Session()
            session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
            adapter = GatedAdapter(pool_connections=len(SOURCE_NAMES), pool_maxsize=32)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _session, _session_pid = session, os.getpid()
        return _session


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# ---------------------------------------------------------------------------------------------------------
# The source interface


def identifier_label(identifier: Identifier) -> str:
    """How error messages name an identifier: its type and masked value ("CNPJ 11.222.333/0001-81")."""
    return f"{identifier.type.value.upper()} {identifier.masked()}"


@dataclass(frozen=True)
class Source:
    """One upstream API: its URL for an identifier, the HTTP call, and the mapping into the normalized schema.

    Subclasses give `_path` and `_normalize`; `_check_body` reads errors that arrive inside HTTP 200.
    """

    name: str
    types: tuple[str, ...]
    settings: SourceSettings

    def to_dict(self) -> dict[str, Any]:
        """The source as a JSON-ready dict."""
        return {
            "name": self.name,
            "types": list(self.types),
            "base_url": self.settings.base_url,
            "timeout": self.settings.timeout,
        }

    def supports(self, identifier: Identifier) -> bool:
        """Whether this upstream can look this identifier up at all."""
        return identifier.type.value in self.types

    def url(self, identifier: Identifier) -> str:
        """The absolute URL of this identifier at this upstream."""
        return self.settings.base_url.rstrip("/") + self._path(identifier)

    def fetch(
        self, identifier: Identifier, session: requests.Session | None = None, gate: SendGate | None = None
    ) -> dict[str, Any]:
        """GET the identifier within the source's timeout; normalized data, or a SourceError saying why not.

        `gate` decides when the request goes out (the rate limiter's send slot): its `before_send`
        once the request is built, its `at_wire` right before the first byte is written; whatever
        either raises ends the fetch with no request made.
        """
        if not self.supports(identifier):
            raise UpstreamRejected(f"{self.name} cannot look up {identifier_label(identifier)}")
        timeout = self.settings.timeout
        http = session if session is not None else default_session()
        # Session.get's own steps, split so that only the send comes after the gate.
        request = http.prepare_request(requests.Request("GET", self.url(identifier)))
        options = http.merge_environment_settings(request.url, {}, True, None, None)
        if gate is not None:
            gate.before_send()
        deadline = time.monotonic() + timeout  # for the whole exchange, not each socket read
        try:
            with (
                _gated(gate, http, request.url),
                http.send(request, timeout=timeout, allow_redirects=True, **options) as response,
            ):
                body = self._read_body(response, deadline)
                status, headers = response.status_code, response.headers
        except requests.Timeout as error:
            raise TransientError(
                f"{self.name}: no answer within {timeout:g}s for {identifier_label(identifier)}"
            ) from error
        except ReadTimeoutError as error:
            raise TransientError(
                f"{self.name}: answer for {identifier_label(identifier)} stalled past {timeout:g}s"
            ) from error
        except (ProtocolError, DecodeError) as error:
            raise BadResponse(
                f"{self.name}: body cut off or undecodable for {identifier_label(identifier)}: {error}"
            ) from error
        except HTTPError as error:
            raise TransientError(
                f"{self.name}: reading the answer for {identifier_label(identifier)} failed: {error}"
            ) from error
        except requests.ConnectionError as error:
            raise TransientError(
                f"{self.name}: connection to {self.settings.base_url} failed: {error}"
            ) from error
        except requests.RequestException as error:
            raise TransientError(
                f"{self.name}: request for {identifier_label(identifier)} failed: {error}"
            ) from error
        return self.parse(identifier, status, body, headers)

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadResponse(
                f"{self.name}: body of {int(declared)} bytes is over the {MAX_BODY_BYTES} byte limit "
                f"(HTTP {response.status_code})"
            )
        chunks: list[bytes] = []
        size = 0
        # read1 returns whatever has arrived, so a body that drips in slowly still meets the deadline below
        # (iter_content would block until a whole chunk came); it also decodes gzip, counted after decoding.
        while chunk := response.raw.read1(READ_CHUNK_BYTES, decode_content=True):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BadResponse(
                    f"{self.name}: body is larger than the {MAX_BODY_BYTES} byte limit "
                    f"(HTTP {response.status_code}); stopped reading"
                )
            # The requests timeout bounds each socket read, not the whole body.
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{self.name}: body took longer than {self.settings.timeout:g}s to arrive"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(
        self, identifier: Identifier, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Turn one HTTP answer into normalized data or the SourceError it means (pure, no I/O)."""
        if not self.supports(identifier):
            raise UpstreamRejected(f"{self.name} cannot look up {identifier_label(identifier)}")
        self._check_status(identifier, status, body, headers)
        data = json_object(self.name, body)
        self._check_body(identifier, data, status)
        return self._normalize(identifier, JsonReader(self.name, data))

    def _check_status(
        self, identifier: Identifier, status: int, body: bytes, headers: Mapping[str, str] | None
    ) -> None:
        if 200 <= status < 300:
            return
        detail = error_detail(body)
        what = f"{self.name}: {identifier_label(identifier)}"
        if status == 429:
            retry_after = _retry_after(headers)
            when = f", retry after {retry_after:g}s" if retry_after is not None else ""
            raise RateLimited(f"{what}: rate limited (HTTP 429{detail}){when}", status, retry_after)
        if status == 404:
            raise NotFound(f"{what} not found (HTTP 404{detail})", status)
        if status == 408 or status >= 500:
            raise TransientError(f"{what}: upstream error (HTTP {status}{detail})", status)
        if 400 <= status < 500:
            raise UpstreamRejected(f"{what} rejected by the upstream (HTTP {status}{detail})", status)
        raise BadResponse(f"{what}: unexpected HTTP {status}{detail}", status)

    def _check_body(self, identifier: Identifier, data: dict[str, Any], status: int) -> None:
        """Raise the error an upstream reports inside a 2xx body; most report none there."""

    def _path(self, identifier: Identifier) -> str:
        raise NotImplementedError

    def _normalize(self, identifier: Identifier, reader: JsonReader) -> dict[str, Any]:
        raise NotImplementedError

    def _same_identifier(self, identifier: Identifier, answered: str | None, length: int) -> str:
        """The identifier the upstream answered for, which must be the one asked (or absent)."""
        normalized = only_alphanumeric(answered)
        if normalized and len(normalized) < length and normalized.isdigit():
            normalized = normalized.zfill(length)  # numeric JSON drops leading zeros
        if not normalized:
            return identifier.value
        if normalized != identifier.value:
            raise BadResponse(
                f"{self.name}: answered for {answered!r} when asked for {identifier_label(identifier)}"
            )
        return normalized
