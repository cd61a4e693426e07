"""upstream_call.py: the guarded upstream call, each of its outcomes, and the outcome table.

`guarded_call` runs against the real parts: the test Redis (breaker state, the log of starts, the
cache) and the sandbox upstream over HTTP, whose request counts show whether a request went out.
"""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from circuit_breaker_manager import BreakerOpen, BreakerUnavailable
from devstack import sandbox as sandbox_module
from enrich.identifiers import Identifier, IdentifierType, parse
from enrich.services import services
from enrich.sources import (
    BadResponse,
    NotFound,
    RateLimited,
    SourceError,
    TransientError,
    UpstreamRejected,
)
from enrich.upstream_call import OUTCOMES, CallResult, Outcome, Paced, guarded_call, outcome_of

SOURCE_TIMEOUT = 1.0


@pytest.fixture
def app(make_sandbox_app):
    """An in-process app on the test Redis whose sources are the sandbox's (no worker).

    ReceitaWS at one call a minute: its log of starts holds 2 starts a minute (rate + burst) and a
    batch call's 1 (the interactive reserve of 2 kept), so a test can fill it and stay full.
    """
    return make_sandbox_app({"RATE_LIMIT_RECEITAWS": "1"}, source_timeout=SOURCE_TIMEOUT)


def requests_made(app, source: str) -> dict[str, float]:
    """This process's count of `source` calls by outcome, from the app's /metrics."""
    response = app.test_client().get("/metrics")
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.get_data(as_text=True))
    return {
        sample.labels["outcome"]: sample.value
        for family in families
        for sample in family.samples
        if sample.name == "enrich_source_requests_total" and sample.labels.get("source") == source
    }


# -- guarded_call: each outcome against the sandbox ------------------------------------------


def test_an_answer_is_returned_and_cached_as_found(parts, sandbox):
    cep = sandbox.known("cep", seed=61)

    call = guarded_call(parts, "viacep", parse(cep), batch=False)

    assert call.outcome is Outcome.OK and call.error is None
    assert call.data["cep"] == cep and call.data["municipio"]
    entry = parts.cache.get("cep", "viacep", cep)
    assert entry is not None and entry.found and entry.data == call.data
    assert sandbox.served("viacep") == 1


def test_not_found_is_cached_as_such_and_counts_as_a_success_for_the_breaker(parts, sandbox):
    cep = sandbox.unknown("cep", seed=62)

    call = guarded_call(parts, "brasilapi", parse(cep), batch=False)

    assert call.outcome is Outcome.NOT_FOUND and isinstance(call.error, NotFound)
    assert "not found" in call.message
    entry = parts.cache.get("cep", "brasilapi", cep)
    assert entry is not None and entry.found is False and entry.data is None
    assert sandbox.stats()["upstreams"]["brasilapi"]["by_status"] == {"404": 1}
    assert parts.breakers.status("brasilapi").failures == 0


def test_a_request_the_upstream_refuses_is_rejected_and_not_cached(parts, sandbox):
    # Built by hand, past parse(): check digits BrasilAPI refuses with a 400.
    bad = Identifier(type=IdentifierType.CNPJ, value="11222333000100")

    call = guarded_call(parts, "brasilapi", bad, batch=False)

    assert call.outcome is Outcome.REJECTED and isinstance(call.error, UpstreamRejected)
    assert "HTTP 400" in call.message
    assert sandbox.stats()["upstreams"]["brasilapi"]["by_status"] == {"400": 1}
    assert parts.cache.get("cnpj", "brasilapi", bad.value) is None
    assert parts.breakers.status("brasilapi").failures == 0  # the upstream works


def test_a_server_error_is_a_failure_the_breaker_counts_and_nothing_is_cached(parts, sandbox):
    sandbox.control("viacep", error_rate=1.0)
    cep = sandbox.known("cep", seed=63)

    call = guarded_call(parts, "viacep", parse(cep), batch=False)

    assert call.outcome is Outcome.FAILED and isinstance(call.error, TransientError)
    assert "HTTP 500" in call.message
    assert sandbox.stats()["upstreams"]["viacep"]["by_status"] == {"500": 1}
    assert parts.cache.get("cep", "viacep", cep) is None
    assert parts.breakers.status("viacep").failures == 1


def test_an_answer_slower_than_the_source_timeout_is_a_failure(parts, sandbox):
    sandbox.control("viacep", latency_ms=SOURCE_TIMEOUT * 1000 + 2000)
    cep = sandbox.known("cep", seed=64)

    call = guarded_call(parts, "viacep", parse(cep), batch=False)

    assert call.outcome is Outcome.FAILED and isinstance(call.error, TransientError)
    assert f"no answer within {SOURCE_TIMEOUT:g}s" in call.message
    assert parts.cache.get("cep", "viacep", cep) is None


def test_an_upstream_429_is_a_failure_that_carries_its_retry_after(parts, sandbox):
    sandbox.control("viacep", quota_per_minute=0)
    cep = sandbox.known("cep", seed=65)

    call = guarded_call(parts, "viacep", parse(cep), batch=False)

    assert call.outcome is Outcome.FAILED and isinstance(call.error, RateLimited)
    assert call.error.retry_after == 60
    assert sandbox.stats()["upstreams"]["viacep"]["by_status"] == {"429": 1}


def test_an_open_breaker_refuses_the_call_without_a_request_and_counts_breaker_open(app, parts, sandbox):
    cep = sandbox.known("cep", seed=66)
    parts.breakers.force_open("viacep")
    before = requests_made(app, "viacep").get("breaker_open", 0)

    call = guarded_call(parts, "viacep", parse(cep), batch=False)

    assert call.outcome is Outcome.CIRCUIT_OPEN and isinstance(call.error, BreakerOpen)
    assert call.error.retry_at is not None
    assert call.message == "circuit breaker for viacep is open"
    assert sandbox.served("viacep") == 0
    assert requests_made(app, "viacep").get("breaker_open", 0) - before == 1
    assert parts.cache.get("cep", "viacep", cep) is None


def test_a_send_slot_too_far_away_paces_the_call_and_no_request_goes_out(parts, sandbox):
    cnpj = sandbox.known("cnpj", seed=67)
    limiter = parts.rate_limiter
    assert [limiter.send_slot("receitaws").taken for _ in range(2)] == [True, True]  # the minute's 1 + 1

    call = guarded_call(parts, "receitaws", parse(cnpj), batch=False)

    assert call.outcome is Outcome.PACED and isinstance(call.error, Paced)
    assert 50 < call.error.wait <= 61  # the oldest slot leaves the minute, widened by half a second
    assert sandbox.served("receitaws") == 0
    status = parts.breakers.status("receitaws")  # withdrawn: neither a success nor a failure
    assert status.state == "closed" and status.failures == 0
    assert parts.cache.get("cnpj", "receitaws", cnpj) is None


def test_a_batch_call_is_paced_where_an_interactive_call_still_goes_out(parts, sandbox):
    cnpj = sandbox.known("cnpj", seed=68)
    assert parts.rate_limiter.send_slot("receitaws").taken  # one send: the reserve of sends begins here

    held = guarded_call(parts, "receitaws", parse(cnpj), batch=True)
    assert held.outcome is Outcome.PACED and sandbox.served("receitaws") == 0

    person = guarded_call(parts, "receitaws", parse(cnpj), batch=False)
    assert person.outcome is Outcome.OK and sandbox.served("receitaws") == 1


def test_calls_released_late_together_reach_the_upstream_one_by_one_not_in_a_bunch(make_sandbox_app, sandbox):
    """Twelve OpenCNPJ calls (20 a second, burst 1), each holding its token, start at the same
    moment, as deferred calls whose slots passed while the broker was busy.  The log of starts let
    rate + burst of them out at once, and the upstream saw them within a few milliseconds; each now
    waits for its send slot, so the sandbox (counting arrivals by the kernel's stamps) sees the
    burst, then one a gap (a little under 1/21 s) after another."""
    app = make_sandbox_app({"RATE_LIMIT_OPENCNPJ": "1200"}, source_timeout=SOURCE_TIMEOUT)
    parts = services(app)
    cnpjs = [cnpj for cnpj in sandbox.identifiers("cnpj", 100, seed=70) if sandbox_module.is_known(cnpj)][:12]
    barrier = threading.Barrier(len(cnpjs))
    outcomes: list[Outcome] = []

    def call(cnpj: str) -> None:
        barrier.wait(10)
        outcomes.append(guarded_call(parts, "opencnpj", parse(cnpj), batch=False).outcome)

    threads = [threading.Thread(target=call, args=(cnpj,)) for cnpj in cnpjs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert outcomes == [Outcome.OK] * 12
    arrived = sandbox.arrivals("opencnpj")
    assert len(arrived) == 12
    gap = parts.rate_limiter.pacing("opencnpj").gap  # 40 ms
    # Slots: two at once, then ten a gap apart (0.4 s); each send within a little of its slot.
    assert arrived[-1] - arrived[0] >= 10 * gap - 0.05
    busiest = max(sum(1 for later in arrived if first <= later < first + 0.2) for first in arrived)
    assert (
        busiest <= 2 + math.ceil(0.2 / gap) + 1
    )  # the burst and the slots of 0.2 s, one more for a late send


def test_an_exception_outside_the_outcomes_propagates_and_nothing_is_cached(parts, sandbox, monkeypatch):
    """A bug inside a fetch is not an outcome.  The sandbox answers over HTTP and cannot make a
    fetch raise something other than a SourceError, so the adapter's fetch is replaced to raise one."""
    cep = sandbox.known("cep", seed=69)

    def broken_fetch(self, identifier, session=None, gate=None):
        raise LookupError("a bug in the adapter")

    monkeypatch.setattr(type(parts.sources["viacep"]), "fetch", broken_fetch)

    with pytest.raises(LookupError, match="a bug in the adapter"):
        guarded_call(parts, "viacep", parse(cep), batch=False)
    assert parts.cache.get("cep", "viacep", cep) is None


# -- the outcome table and CallResult ---------------------------------------------------------


def test_every_exception_class_in_the_outcome_table_comes_before_its_bases():
    for position, (earlier, _) in enumerate(OUTCOMES):
        for later, _ in OUTCOMES[position + 1 :]:
            assert not issubclass(later, earlier), f"{later.__name__} is shadowed by {earlier.__name__}"


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (Paced(0.5), Outcome.PACED),
        (NotFound("gone", 404), Outcome.NOT_FOUND),
        (UpstreamRejected("refused", 400), Outcome.REJECTED),
        (BreakerOpen("viacep", None), Outcome.CIRCUIT_OPEN),
        (TransientError("timeout"), Outcome.FAILED),
        (RateLimited("429", retry_after=3), Outcome.FAILED),
        (BadResponse("garbage"), Outcome.FAILED),
        (BreakerUnavailable("viacep"), Outcome.FAILED),
        (SourceError("other", 418), Outcome.REJECTED),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_an_exception_maps_to_the_outcome_of_its_most_specific_class(error, outcome):
    assert outcome_of(error) is outcome


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (
            CallResult(Outcome.NOT_FOUND, error=NotFound("viacep: CEP 01310-100 not found", 404)),
            "viacep: CEP 01310-100 not found",
        ),
        (
            CallResult(Outcome.FAILED, error=BreakerUnavailable("viacep")),
            "breaker state unavailable: circuit breaker state for viacep is unreachable",
        ),
        (
            CallResult(Outcome.CIRCUIT_OPEN, error=BreakerOpen("viacep", 1.0)),
            "circuit breaker for viacep is open",
        ),
        (CallResult(Outcome.PACED, error=Paced(0.25)), "wait 0.250s for the rate limit"),
        (CallResult(Outcome.OK, data={"cep": "01310100"}), ""),
    ],
    ids=["source-error", "breaker-unavailable", "breaker-open", "paced", "ok"],
)
def test_a_call_result_says_what_went_wrong_in_a_line(result, message):
    assert result.message == message
