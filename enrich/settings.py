"""Service settings: one frozen dataclass read from the environment (documented in README)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from limits import parse_many

# Sources known to the service and their upstreams' quotas (requests per minute; the sandbox
# enforces the same).  Each source's limiter defaults to just under its quota with a burst of
# 1, so that network jitter can never push a sliding 60 s window over the quota.
SOURCE_NAMES = ("brasilapi", "receitaws", "opencnpj", "viacep")
UPSTREAM_QUOTA_PER_MINUTE = {"brasilapi": 600, "receitaws": 3, "opencnpj": 300, "viacep": 600}
LIVE_BASE_URLS = {
    "brasilapi": "https://brasilapi.com.br",
    "receitaws": "https://receitaws.com.br",
    "opencnpj": "https://api.opencnpj.org",
    "viacep": "https://viacep.com.br",
}
DEFAULT_PORTS = {"http": 80, "https": 443}
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
RATE_LIMIT_OFF = ("", "off", "none")  # a per-client limit set to one of these is no limit


@dataclass(frozen=True)
class SourceSettings:
    """Per-source limits: rate, timeout and breaker thresholds."""

    name: str
    base_url: str
    rate_per_minute: float
    burst: int
    timeout: float
    breaker_fail_max: int
    breaker_reset_timeout: float
    breaker_success_threshold: int


# Profiles: one setting (PROFILE) picks a column of defaults; a variable of its own still wins
# over its profile's value.  `development` is the fields' own defaults (what `make run` and the
# tests use).  The table is printed in the README; keep the two in step.
PROFILES: dict[str, dict[str, Any]] = {
    "development": {},
    "production": {
        "log_format": "json",
        "web_workers": 4,
        "worker_concurrency": 32,
        "redis_max_connections": 20,
        "quota_headroom": 0.9,
        "breaker_fail_max": 5,
        "breaker_reset_timeout": 60.0,
        "breaker_success_threshold": 2,
        "near_cache_size": 50_000,
        "lookup_rate_limit": "60/minute",
        "batch_concurrency": 16,
        "batch_token_reserve": 2,
    },
    "high-load": {
        "log_format": "json",
        "log_level": "WARNING",
        "web_workers": 8,
        "worker_concurrency": 64,
        "redis_max_connections": 50,
        "quota_headroom": 0.95,
        "breaker_fail_max": 10,
        "breaker_reset_timeout": 30.0,
        "breaker_success_threshold": 2,
        "breaker_half_open_probes": 2,
        "near_cache_size": 200_000,
        "lookup_rate_limit": "600/minute",
        "sse_heartbeat_interval": 30.0,
        "batch_max_rows": 10_000,
        "batch_concurrency": 32,
        "batch_token_reserve": 4,
    },
}


def normalise_origin(value: str, whole_url: bool = False) -> str:
    """The web origin `scheme://host[:port]` of `value`: lowercased, a default port (80, 443) left out.

    `value` is an origin (an `Origin` header, an ALLOWED_ORIGINS entry; a trailing `/` is
    tolerated), or with `whole_url` any http(s) URL (a `Referer`), whose path and query are
    ignored.  ValueError for anything else: another scheme, credentials, a malformed host or port.
    """
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or "@" in parts.netloc or not parts.hostname:
        raise ValueError(f"{value!r} is not an http or https origin such as https://app.example.com")
    if not whole_url and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"{value!r} is not an origin: it has a path, a query or a fragment")
    host = parts.hostname  # lowercased, an IPv6 address without its brackets
    try:
        port = parts.port
        if ":" in host:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        elif not HOST_NAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name")
    except ValueError as error:
        raise ValueError(f"{value!r} is not an origin: {error}") from error
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def parse_allowed_origins(text: str) -> frozenset[str]:
    """ALLOWED_ORIGINS, comma-separated, as normalised origins; ValueError naming a malformed entry."""
    origins = set()
    for entry in text.split(","):
        if entry.strip():
            try:
                origins.add(normalise_origin(entry))
            except ValueError as error:
                raise ValueError(f"setting ALLOWED_ORIGINS: {error}") from error
    return frozenset(origins)


def parse_allowed_hosts(text: str) -> list[str]:
    """ALLOWED_HOSTS, comma-separated host names or IPv4 addresses (no scheme, no port; `.example.com`
    takes every subdomain); [] means any host (also for `*`).  ValueError naming a malformed entry.

    No IPv6 literal: werkzeug's host check cuts an entry at its first colon, so `::1` can never match.
    """
    hosts = [entry.strip().lower() for entry in text.split(",") if entry.strip()]
    if "*" in hosts:
        return []
    for host in hosts:
        if not HOST_NAME.fullmatch(host.removeprefix(".")):
            raise ValueError(
                f"setting ALLOWED_HOSTS: {host!r} is not a host name or IPv4 address (no scheme, port, "
                "path or IPv6 literal)"
            )
    return hosts


def _env(environ: Mapping[str, str], name: str, default: Any, kind: type) -> Any:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"setting {name}={raw!r} is not a valid {kind.__name__}") from error


@dataclass(frozen=True)
class Settings:
    """Every setting of the service; `Settings.from_env()` reads them from the environment."""

    # Which column of PROFILES supplies the defaults below (development, production, high-load).
    profile: str = "development"

    # Logs and metrics
    log_format: str = "text"  # text (for people) or json (one object a line, for collectors)
    log_level: str = "INFO"
    worker_metrics_port: int = 9101  # each Celery worker serves its own /metrics here; 0 turns it off
    # Address of the workers' /metrics: loopback by default, like HOST; 0.0.0.0 when a Prometheus on
    # another machine scrapes them (production).
    worker_metrics_host: str = "127.0.0.1"
    metrics_dir: str = ""  # gunicorn multiprocess metrics files; empty: DATA_DIR/metrics

    # Feature flags: these are the defaults; a value set at run time (admin API, `flask flags`)
    # is kept in Redis and wins without a restart (feature_flags.py).
    rate_limiting_enabled: bool = True
    circuit_breaker_enabled: bool = True
    cache_enabled: bool = True
    flags_refresh_interval: float = 1.0  # seconds a process may act on flags it read earlier

    # Redis: REDIS_URL unset means "start the embedded Valkey server" (make run).
    redis_url: str = ""
    embedded_redis_port: int = 6390
    data_dir: str = "var"
    redis_socket_timeout: float = 1.0
    redis_max_connections: int = 6  # per process; callers beyond it wait (up to the socket timeout)
    key_prefix: str = "enrich"

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    web_workers: int = 2
    admin_token: str = ""
    # Failed admin authentications (401) a client address may make, flask-limiter notation; "off" for none.
    admin_auth_limit: str = "10/minute"
    # Other sites' pages whose POST/PUT/PATCH/DELETE are accepted (comma-separated origins such as
    # https://app.example.com); the service's own origin always is (origin_check.py).
    allowed_origins: str = ""
    # Host names the service answers to (Flask's TRUSTED_HOSTS; empty or * = any).  A page whose
    # name was rebound to the service's address sends its own name: 400 instead of an answer.
    allowed_hosts: str = "localhost,127.0.0.1"
    lookup_rate_limit: str = "60/minute"  # per client address, on POST /api/lookups; "off" for none
    trusted_proxies: int = 0  # reverse proxies in front whose X-Forwarded-For is believed
    max_request_bytes: int = 64 * 1024

    # Sources and the sandbox upstream
    sources_mode: str = "sandbox"
    sandbox_host: str = "127.0.0.1"
    sandbox_port: int = 8090
    source_timeout: float = 8.0
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 30.0
    breaker_success_threshold: int = 1
    breaker_half_open_probes: int = 1
    # Each source's rate limit defaults to this share of its upstream's quota.
    quota_headroom: float = 0.95

    # Cache
    cache_ttl_cnpj: int = 7 * 86400
    cache_ttl_cep: int = 30 * 86400
    cache_not_found_ttl: int = 3600
    cache_stale_ttl: int = 30 * 86400
    near_cache_size: int = 10_000  # entries kept in each process's memory; 0 turns the near cache off
    near_cache_max_age: float = 30.0  # seconds an entry may stay in memory, whatever invalidations say

    # Lookups and the job queue
    lookup_deadline: float = 15.0
    lookup_retention: float = 86400.0
    lookup_record_ttl: int = 2 * 86400
    retry_max: int = 4
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 60.0
    defer_horizon: float = 900.0
    deferred_poll_interval: float = 0.2
    visibility_timeout: int = 120
    # Broker connections per process for sending tasks and control commands.  4 serve the service;
    # Flower needs more (its concurrent inspect calls deadlock on 4: README, Deploy).
    broker_pool_limit: int = 4
    worker_concurrency: int = 16
    cep_prefetch: bool = True  # fetch a company's CEP as soon as one company source names it
    worker_heartbeat_ttl: int = 60
    health_check_interval: float = 300.0
    cleanup_interval: float = 6 * 3600.0
    dead_letter_max: int = 10000
    sse_heartbeat_interval: float = 15.0
    # A complete lookup's event log is only replayed to a stream that reconnects right then; any
    # later stream gets the snapshot and a `complete` made from the record, so the log need not
    # be kept for the record's two days (it was half of Redis's memory per lookup).
    event_log_ttl_after_complete: int = 120

    # Bulk batches (enrich/batches/)
    batch_rate_limit: str = "30/hour"  # per client address, on POST /api/batches; "off" for none
    batch_max_rows: int = 10_000  # input rows a batch may have (invalid and duplicate rows count)
    batch_max_bytes: int = 4 * 1024 * 1024  # body of POST /api/batches (others: MAX_REQUEST_BYTES)
    batch_concurrency: int = 8  # batch items in flight across the cluster, all batches together
    # Tokens of each source's bucket kept for interactive lookups: a batch item's call takes one
    # only while more would remain (rate_limiter.py).
    batch_token_reserve: int = 2
    # Longest a batch call waits for its source's rate limit (a token above the reserve, room in the
    # log of starts), counted from when it was first held; then it skips the source.
    batch_source_wait: float = 5.0
    # Seconds an item waits with nothing happening to its lookup (from its last sign of work; never
    # less than visibility_timeout plus two sweeps) before that work counts as lost, and then only
    # if no task of it is left to run: it settles `failed` saying so (batches.runner.BatchRunner.item_limit).
    batch_item_timeout: float = 120.0
    batch_poll_interval: float = 0.2  # how often a running batch collects answers and starts items
    batch_retention: float = 7 * 86400.0  # a batch and its results are kept this long
    # The bytes all batches kept may hold in Redis, and one client address's share (batches/storage.py).
    batch_storage_max_bytes: int = 1024 * 1024 * 1024
    batch_storage_per_client_bytes: int = 64 * 1024 * 1024

    sources: dict[str, SourceSettings] = field(default_factory=dict, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `environ` (default os.environ); keyword overrides win."""
        environ = os.environ if environ is None else environ
        profile = overrides.get("profile") or _env(environ, "PROFILE", cls.profile, str)
        if profile not in PROFILES:
            raise ValueError(f"setting PROFILE must be one of {', '.join(PROFILES)}, not {profile!r}")
        defaults = PROFILES[profile]
        values: dict[str, Any] = {}
        for item in fields(cls):
            if item.name == "sources":
                continue
            default = defaults.get(item.name, item.default)
            values[item.name] = _env(environ, item.name.upper(), default, type(item.default))
        values.update({k: v for k, v in overrides.items() if k != "sources"})
        values["profile"] = profile
        if values["sources_mode"] not in ("sandbox", "live"):
            raise ValueError("setting SOURCES_MODE must be 'sandbox' or 'live'")
        if values["log_format"] not in ("text", "json"):
            raise ValueError("setting LOG_FORMAT must be 'text' or 'json'")
        values["log_level"] = str(values["log_level"]).upper()  # Celery, gunicorn and logging all take it
        if values["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("setting LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        parse_allowed_origins(values["allowed_origins"])  # a malformed entry fails here, at start-up
        parse_allowed_hosts(values["allowed_hosts"])
        limit = values["admin_auth_limit"]
        if limit.strip().lower() not in RATE_LIMIT_OFF:
            try:
                parse_many(limit)
            except ValueError as error:
                raise ValueError(
                    f"setting ADMIN_AUTH_LIMIT={limit!r} is not a rate limit such as 10/minute (or off)"
                ) from error
        settings = cls(**values)
        sources = {name: settings._source(environ, name) for name in SOURCE_NAMES}
        return replace(settings, sources=overrides.get("sources", sources))

    def _source(self, environ: Mapping[str, str], name: str) -> SourceSettings:
        upper = name.upper()
        if self.sources_mode == "live":
            base_url = LIVE_BASE_URLS[name]
        else:
            base_url = f"{self.sandbox_url}/{name}"
        return SourceSettings(
            name=name,
            base_url=_env(environ, f"{upper}_BASE_URL", base_url, str),
            rate_per_minute=_env(
                environ, f"RATE_LIMIT_{upper}", UPSTREAM_QUOTA_PER_MINUTE[name] * self.quota_headroom, float
            ),
            burst=_env(environ, f"RATE_BURST_{upper}", 1, int),
            timeout=_env(environ, f"TIMEOUT_{upper}", self.source_timeout, float),
            breaker_fail_max=_env(environ, f"BREAKER_FAIL_MAX_{upper}", self.breaker_fail_max, int),
            breaker_reset_timeout=_env(
                environ, f"BREAKER_RESET_TIMEOUT_{upper}", self.breaker_reset_timeout, float
            ),
            breaker_success_threshold=_env(
                environ, f"BREAKER_SUCCESS_THRESHOLD_{upper}", self.breaker_success_threshold, int
            ),
        )

    @property
    def sandbox_url(self) -> str:
        return f"http://{self.sandbox_host}:{self.sandbox_port}"

    @property
    def effective_metrics_dir(self) -> str:
        """Where gunicorn's workers keep their metrics files (prometheus-client multiprocess mode)."""
        return self.metrics_dir or os.path.join(self.data_dir, "metrics")

    @property
    def effective_redis_url(self) -> str:
        """REDIS_URL, or the embedded server's URL when it is unset."""
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    def cache_ttl(self, identifier_type: str) -> int:
        """Fresh TTL in seconds for a cache entry of this identifier type."""
        return {"cnpj": self.cache_ttl_cnpj, "cep": self.cache_ttl_cep}[identifier_type]
