"""The sandbox upstream: the real APIs' paths and body shapes over HTTP, with per-upstream fault injection.

Serve it with ONE worker so its counters and quota windows are a single truth:
    gunicorn -k gevent -w 1 -b 127.0.0.1:8090 'devstack.sandbox:create_app()'

Under `-k devstack.sandbox_worker.StampingGeventWorker` every request is counted at the time the
kernel stamped its bytes on arrival, which CPU starvation of this process cannot bunch; under any
other worker (or a test client) at the time its handler ran.  `GET /_arrivals/<upstream>` gives both
times of every request; `/_probe/<n>` is a path of no upstream, for an instrument's calibration.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson
from flask import Flask, Response, current_app, jsonify, request

from devstack import sandbox_bodies, sandbox_data
from devstack.sandbox_data import is_known  # noqa: F401  (re-exported: tests pick found / not-found values with it)
from enrich.identifiers import Identifier, IdentifierType, InvalidIdentifier, parse
from enrich.settings import SOURCE_NAMES, UPSTREAM_QUOTA_PER_MINUTE

QUOTA_WINDOW_SECONDS = 60.0
MAX_LATENCY_MS = 600_000


class ControlError(ValueError):
    """A `/_control` body (or SANDBOX_* variable) that cannot be applied; the message says why."""


@dataclass(frozen=True)
class FaultConfig:
    """The faults injected into one upstream. `POST /_control` sets any subset of these fields."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    outage: bool = False
    quota_per_minute: int | None = None  # None: no quota
    override: Mapping[str, Any] | None = None  # top-level fields replaced in every 200 JSON object answer
    body: str | None = None  # garbage instead of every answer: one of BODY_FAULTS

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> FaultConfig:
        """A copy with `changes` applied; raises ControlError naming the first bad field."""
        validate_fault_changes(changes)
        return replace(self, **changes)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_milliseconds(value: Any) -> str | None:
    ok = _is_number(value) and 0 <= value <= MAX_LATENCY_MS
    return None if ok else f"must be a number of milliseconds from 0 to {MAX_LATENCY_MS}"


def _check_share(value: Any) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else "must be a number from 0 to 1"


def _check_flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _check_quota(value: Any) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    return None if ok else "must be a whole number of requests per minute (0 or more) or null for no quota"


def _check_override(value: Any) -> str | None:
    if value is None:
        return None
    scalar = (str, int, float, bool, type(None))
    ok = (
        isinstance(value, dict)
        and len(value) <= 32
        and all(isinstance(k, str) and 0 < len(k) <= 64 for k in value)
        and all(
            isinstance(v, scalar) and (not isinstance(v, str) or len(v) <= 10_000) for v in value.values()
        )
    )
    return (
        None
        if ok
        else "must be null or an object of up to 32 field names to text, number, true/false or null"
    )


BODY_FAULTS = ("invalid_json", "html_error", "truncated", "wrong_types", "huge", "empty")


def _check_body(value: Any) -> str | None:
    return (
        None if value is None or value in BODY_FAULTS else f"must be null or one of {', '.join(BODY_FAULTS)}"
    )


# One check per FaultConfig field: a new fault is a new field plus its check here.
FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "latency_ms": _check_milliseconds,
    "jitter_ms": _check_milliseconds,
    "error_rate": _check_share,
    "outage": _check_flag,
    "quota_per_minute": _check_quota,
    "override": _check_override,
    "body": _check_body,
}


def validate_fault_changes(changes: Mapping[str, Any]) -> None:
    """Raise ControlError unless every key is a FaultConfig field and every value fits it."""
    for name, value in changes.items():
        check = FIELD_CHECKS.get(name)
        if check is None:
            raise ControlError(f"unknown fault field {name!r}; fields are {', '.join(FIELD_CHECKS)}")
        problem = check(value)
        if problem:
            raise ControlError(f"{name} {problem}, got {value!r}")


@dataclass(frozen=True)
class Admission:
    """What the faults decide for one request before the upstream's own answer."""

    outage: bool = False
    retry_after: int | None = None  # set when the request is over the quota
    quota: int | None = None
    delay: float = 0.0
    error: bool = False
    override: Mapping[str, Any] | None = None
    body: str | None = None


class Arrivals:
    """When one upstream's requests arrived, and the most any sliding second and minute held.

    Times are epoch seconds: the kernel's stamp of the request's bytes when the worker gives one,
    else the handler's clock.  Requests handled concurrently may be recorded out of arrival order,
    so the times are kept sorted and the busiest windows are recounted, when asked, from the oldest
    time recorded since (a window can only have gained).  Only the last `keep` requests are kept.
    """

    SPANS = (1.0, 60.0)

    def __init__(self, keep: int = 200_000) -> None:
        self.keep = keep
        self.times: list[float] = []  # sorted arrival times
        # (arrived, handled, tag) in handling order: the tag is what the request asked for
        self.records: deque[tuple[float, float, int | str | None]] = deque(maxlen=keep)
        self.kernel_stamped = 0
        self._busiest = dict.fromkeys(self.SPANS, 0)
        self._changed_from: float | None = None

    def add(self, arrived: float, handled: float, kernel: bool, tag: int | str | None = None) -> None:
        bisect.insort(self.times, arrived)
        self.records.append((arrived, handled, tag))
        self.kernel_stamped += kernel
        self._changed_from = arrived if self._changed_from is None else min(self._changed_from, arrived)
        if len(self.times) > 2 * self.keep:
            self.busiest()  # counted before the oldest half goes
            del self.times[: self.keep]

    def busiest(self) -> dict[float, int]:
        """The most arrivals in any half-open window of each span, {1.0: n, 60.0: m}."""
        if self._changed_from is not None:
            times = self.times
            for span in self.SPANS:
                best = self._busiest[span]
                first = bisect.bisect_left(times, self._changed_from - span)
                end = first
                for start in range(first, len(times)):
                    limit = times[start] + span
                    while end < len(times) and times[end] < limit:
                        end += 1
                    best = max(best, end - start)
                self._busiest[span] = best
            self._changed_from = None
        return dict(self._busiest)


class _Upstream:
    def __init__(self, fault: FaultConfig) -> None:
        self.fault = fault
        self.window: deque[float] = deque()  # monotonic times of admitted requests in the last minute
        self.by_status: Counter[int] = Counter()
        # What a real upstream's per-second and per-minute quota would judge, counted exactly.
        self.arrivals = Arrivals()


class SandboxState:
    """Per-upstream faults, quota windows and request counts; one lock guards them all."""

    def __init__(self, defaults: Mapping[str, FaultConfig], seed: int | None = None) -> None:
        self._defaults = dict(defaults)
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._upstreams = {name: _Upstream(fault) for name, fault in self._defaults.items()}
        self._probe = Arrivals()

    def admit(self, upstream: str, arrived: float | None = None, tag: str | None = None) -> Admission:
        """Decide outage, quota, latency and injected error for one request, counting it in the quota.

        `arrived`: when the request's bytes arrived by the kernel's stamp (epoch seconds); without
        it the request is counted as arriving now.  `tag`: what it asked for (the identifier), kept
        with its times for `arrivals`.
        """
        now = time.monotonic()
        handled = time.time()
        with self._lock:
            state = self._upstreams[upstream]
            state.arrivals.add(handled if arrived is None else arrived, handled, arrived is not None, tag)
            fault = state.fault
            if fault.outage:
                return Admission(outage=True)
            quota = fault.quota_per_minute
            if quota is not None:
                window = state.window
                while window and window[0] <= now - QUOTA_WINDOW_SECONDS:
                    window.popleft()
                if len(window) >= quota:
                    # Refused requests stay out of the window, as real quotas count served calls.
                    wait = window[0] + QUOTA_WINDOW_SECONDS - now if window else QUOTA_WINDOW_SECONDS
                    return Admission(retry_after=max(1, math.ceil(wait)), quota=quota)
                window.append(now)
            jitter = self._random.uniform(-fault.jitter_ms, fault.jitter_ms) if fault.jitter_ms else 0.0
            error = fault.error_rate > 0 and self._random.random() < fault.error_rate
        return Admission(
            delay=max(0.0, fault.latency_ms + jitter) / 1000,
            error=error,
            override=fault.override,
            body=fault.body,
        )

    def probe(self, tag: int, arrived: float | None = None) -> None:
        """Count one request of the calibration path (no upstream's, no faults), tagged `tag`."""
        handled = time.time()
        with self._lock:
            self._probe.add(handled if arrived is None else arrived, handled, arrived is not None, tag)

    def arrivals(self, name: str) -> dict[str, Any]:
        """Every request of upstream `name` (or `_probe`) kept: [arrived, handled, tag] in handling order."""
        with self._lock:
            log = self._probe if name == "_probe" else self._upstreams[name].arrivals
            return {"kernel_stamped": log.kernel_stamped, "requests": [list(entry) for entry in log.records]}

    def record(self, upstream: str, status: int) -> None:
        """Count one answered request."""
        with self._lock:
            self._upstreams[upstream].by_status[status] += 1

    def stats(self) -> dict[str, Any]:
        """Requests served per upstream, in total and by HTTP status."""
        with self._lock:
            return {
                "upstreams": {
                    name: {
                        "requests": sum(state.by_status.values()),
                        "busiest_second": busiest[1.0],  # most arrivals in any sliding 1 s
                        "busiest_minute": busiest[60.0],  # ... and in any sliding 60 s
                        "kernel_stamped": state.arrivals.kernel_stamped,  # arrivals timed by the kernel
                        "by_status": {
                            str(status): count for status, count in sorted(state.by_status.items())
                        },
                    }
                    for name, state in self._upstreams.items()
                    for busiest in (state.arrivals.busiest(),)
                }
            }

    def faults(self) -> dict[str, Any]:
        """The fault config of every upstream."""
        with self._lock:
            return {"upstreams": {name: state.fault.to_dict() for name, state in self._upstreams.items()}}

    def control(self, payload: Any) -> None:
        """Apply a `/_control` body: `{"reset": true}` and/or `{"upstream": name, <fault fields>}`."""
        if not isinstance(payload, dict):
            raise ControlError("body must be a JSON object")
        reset = payload.get("reset", False)
        if not isinstance(reset, bool):
            raise ControlError(f"reset must be true or false, got {reset!r}")
        changes = {key: value for key, value in payload.items() if key not in ("reset", "upstream")}
        validate_fault_changes(changes)  # everything is checked before anything changes
        upstream = payload.get("upstream")
        if "upstream" in payload or changes:
            if upstream not in self._upstreams:
                raise ControlError(
                    f"unknown upstream {upstream!r}; upstreams are {', '.join(self._upstreams)}"
                )
        elif not reset:
            raise ControlError('nothing to do: send {"reset": true} or {"upstream": name, <fault fields>}')
        with self._lock:
            if reset:
                self._upstreams = {name: _Upstream(fault) for name, fault in self._defaults.items()}
                self._probe = Arrivals()
            if upstream is not None:
                state = self._upstreams[upstream]
                state.fault = replace(state.fault, **changes)

    def reset(self) -> None:
        """Counts, quota windows and faults back to the defaults."""
        self.control({"reset": True})


def default_faults(environ: Mapping[str, str]) -> dict[str, FaultConfig]:
    """Start-up faults: quotas from UPSTREAM_QUOTA_PER_MINUTE or SANDBOX_QUOTA_<NAME>, SANDBOX_LATENCY_MS."""
    latency = _env_value(environ, "SANDBOX_LATENCY_MS", 0.0, float)
    faults = {}
    for name in SOURCE_NAMES:
        variable = f"SANDBOX_QUOTA_{name.upper()}"
        quota = _env_value(environ, variable, int(UPSTREAM_QUOTA_PER_MINUTE[name]), int)
        try:
            faults[name] = FaultConfig().updated({"latency_ms": latency, "quota_per_minute": quota})
        except ControlError as error:
            raise ValueError(f"SANDBOX_LATENCY_MS or {variable}: {error}") from None
    return faults


def _env_value(environ: Mapping[str, str], name: str, default: Any, kind: type) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if kind is int and raw.lower() in ("none", "off", "unlimited"):
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


# ---------------------------------------------------------------------------------------------------------
# Answers


def _json(body: Any, status: int = 200) -> tuple[Response, int]:
    return jsonify(body), status


def _html(status: int, title: str) -> Response:
    page = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center></body></html>"
    return Response(page, status, content_type="text/html; charset=utf-8")


def _over_quota(admission: Admission) -> tuple[Response, int]:
    response, status = _json(
        sandbox_bodies.quota_exceeded(admission.quota or 0, admission.retry_after or 0), 429
    )
    response.headers["Retry-After"] = str(admission.retry_after)
    return response, status


def _injected_error(upstream: str) -> Response | tuple[Response, int]:
    if upstream == "brasilapi":
        return _json(sandbox_bodies.brasilapi_internal_error(), 500)
    return _html(500, "500 Internal Server Error")


def _overridden(answer: Any, override: Mapping[str, Any]) -> Any:
    """A 200 JSON object answer with the override's fields put in (hostile names, odd values)."""
    if not isinstance(answer, tuple) or answer[1] != 200:
        return answer
    body = answer[0].get_json(silent=True)
    if not isinstance(body, dict):
        return answer
    return _json({**body, **override})


HUGE_BODY_BYTES = 20 * 1024 * 1024


def _garbage(kind: str, answer: Any) -> Response:
    """A 200 whose body is not what the API documents, as broken proxies and upstreams send."""
    real = answer[0].get_data() if isinstance(answer, tuple) else answer.get_data()
    if kind == "invalid_json":
        return Response(
            b"{'razao_social': 'ACME', cnpj: 11222333000181,}", 200, content_type="application/json"
        )
    if kind == "html_error":
        return _html(200, "502 Bad Gateway - the origin did not answer")
    if kind == "truncated":
        # The declared length promises the whole body; the connection closes after half of it.
        response = Response(iter([real[: max(1, len(real) // 2)]]), 200, content_type="application/json")
        response.headers["Content-Length"] = str(len(real))
        return response
    if kind == "wrong_types":
        body = orjson.loads(real) if real.strip().startswith(b"{") else {}
        flipped = {key: _wrong_type(value) for key, value in body.items()} or {"razao_social": 12345}
        return Response(orjson.dumps(flipped), 200, content_type="application/json")
    if kind == "huge":
        chunk = b"1," * 32768
        chunks = (chunk for _ in range(HUGE_BODY_BYTES // len(chunk)))
        return Response(itertools.chain([b"["], chunks, [b"1]"]), 200, content_type="application/json")
    return Response(b"", 200, content_type="application/json")  # empty


def _wrong_type(value: Any) -> Any:
    if isinstance(value, str):
        return 12345
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return {"items": value}
    return "not a number"


def _valid(value: str, kind: IdentifierType) -> Identifier | None:
    try:
        return parse(value, kind.value)
    except InvalidIdentifier:
        return None


def _brasilapi_cnpj(value: str) -> Any:
    cnpj = _valid(value, IdentifierType.CNPJ)
    if cnpj is None:
        return _json(sandbox_bodies.brasilapi_invalid("CNPJ", value), 400)
    if not is_known(cnpj.value):
        return _json(sandbox_bodies.brasilapi_not_found("CNPJ", cnpj.masked()), 404)
    return _json(sandbox_bodies.brasilapi_cnpj(sandbox_data.company_for_cnpj(cnpj.value)))


def _brasilapi_cep(value: str) -> Any:
    cep = _valid(value, IdentifierType.CEP)
    if cep is None:
        return _json(sandbox_bodies.brasilapi_cep_invalid(), 400)
    if not is_known(cep.value):
        return _json(sandbox_bodies.brasilapi_cep_not_found(), 404)
    return _json(sandbox_bodies.brasilapi_cep(sandbox_data.place_for_cep(cep.value)))


def _receitaws_cnpj(value: str) -> Any:
    cnpj = _valid(value, IdentifierType.CNPJ)
    # ReceitaWS reports every error inside HTTP 200 and predates the alphanumeric CNPJ.
    if cnpj is None or not cnpj.value.isdigit():
        return _json({"status": "ERROR", "message": "CNPJ inválido"})
    if not is_known(cnpj.value):
        return _json({"status": "ERROR", "message": "CNPJ rejeitado pela Receita Federal"})
    return _json(sandbox_bodies.receitaws_cnpj(sandbox_data.company_for_cnpj(cnpj.value)))


def _opencnpj(value: str) -> Any:
    cnpj = _valid(value, IdentifierType.CNPJ)
    if cnpj is None:
        return _json({"error": "invalid cnpj"}, 400)
    if not is_known(cnpj.value):
        return _json({"error": "not found"}, 404)
    return _json(sandbox_bodies.opencnpj_cnpj(sandbox_data.company_for_cnpj(cnpj.value)))


def _viacep(value: str) -> Any:
    cep = _valid(value, IdentifierType.CEP)
    if cep is None:  # ViaCEP answers a malformed CEP with an HTML error page
        return _html(400, "Http 400 - Verifique a sua URL (Bad Request)")
    if not is_known(cep.value):
        return _json(sandbox_bodies.viacep_not_found(cep.value))
    return _json(sandbox_bodies.viacep_cep(sandbox_data.place_for_cep(cep.value)))


ROUTES: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("brasilapi", "/api/cnpj/v1/<value>", _brasilapi_cnpj),
    ("brasilapi", "/api/cep/v2/<value>", _brasilapi_cep),
    ("receitaws", "/v1/cnpj/<value>", _receitaws_cnpj),
    ("opencnpj", "/<value>", _opencnpj),
    ("viacep", "/ws/<value>/json/", _viacep),
)


def _with_faults(upstream: str, answer: Callable[[str], Any]) -> Callable[..., Any]:
    def view(value: str) -> Any:
        admission = sandbox_state().admit(upstream, _arrived(), value)
        if admission.outage:
            return _html(503, "503 Service Temporarily Unavailable")
        if admission.retry_after is not None:
            return _over_quota(admission)
        if admission.delay:
            time.sleep(admission.delay)  # gevent-patched under `gunicorn -k gevent`: other requests go on
        if admission.error:
            return _injected_error(upstream)
        if admission.body:
            return _garbage(admission.body, answer(value))
        if admission.override:
            return _overridden(answer(value), admission.override)
        return answer(value)

    return view


def _arrived() -> float | None:
    """The kernel's stamp of this request's arrival, under devstack.sandbox_worker's worker."""
    return getattr(request.environ.get("gunicorn.socket"), "arrived_at", None)


def sandbox_state() -> SandboxState:
    """The current app's sandbox state."""
    return current_app.extensions["sandbox"]


def _upstream_of_request() -> str | None:
    first = request.path.split("/", 2)[1]
    return first if first in SOURCE_NAMES else None


def create_app(environ: Mapping[str, str] | None = None) -> Flask:
    """The sandbox Flask app; fault defaults come from SANDBOX_* variables in `environ` (default os.environ)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["sandbox"] = SandboxState(default_faults(os.environ if environ is None else environ))

    for upstream, rule, answer in ROUTES:
        endpoint = f"{upstream}:{answer.__name__.strip('_')}"
        app.add_url_rule(f"/{upstream}{rule}", endpoint, _with_faults(upstream, answer), methods=["GET"])

    @app.after_request
    def count(response: Response) -> Response:
        upstream = _upstream_of_request()
        if upstream is not None:
            sandbox_state().record(upstream, response.status_code)
        return response

    @app.errorhandler(404)
    def not_found(error: Exception) -> Any:
        if _upstream_of_request() == "brasilapi":
            return _json(sandbox_bodies.brasilapi_route_not_found(), 404)
        return _json({"error": "not_found", "message": f"no route {request.path}"}, 404)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", 200, content_type="text/plain")

    @app.get("/_stats")
    def stats() -> Any:
        return _json(sandbox_state().stats())

    @app.get("/_probe/<int:tag>")
    def probe(tag: int) -> Any:
        sandbox_state().probe(tag, _arrived())
        return _json({"tag": tag})

    @app.get("/_arrivals/<name>")
    def arrivals(name: str) -> Any:
        if name != "_probe" and name not in SOURCE_NAMES:
            return _json({"error": "not_found", "message": f"no upstream {name!r}"}, 404)
        return _json(sandbox_state().arrivals(name))

    @app.get("/_control")
    def faults() -> Any:
        return _json(sandbox_state().faults())

    @app.post("/_control")
    def control() -> Any:
        try:
            sandbox_state().control(request.get_json(force=True, silent=True))
        except ControlError as error:
            return _json({"error": "invalid_control", "message": str(error)}, 400)
        return _json(sandbox_state().faults())

    return app
