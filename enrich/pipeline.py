"""What happens to one lookup: start (cache, single flight, fan-out), each source call, finalize.

Plain functions called by the API, the CLI, the batch runner and the Celery tasks in job_queue,
each given the app's parts (`Services`) it works with.  A source call's upstream request takes
the guarded path of upstream_call.py; this module decides what each outcome means for the lookup.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid

from cache_manager import CacheEntry
from circuit_breaker_manager import BreakerOpen
from enrich import call_pool, cpf_answers, cross_checks, log_redaction, log_setup, metrics, redis_broker
from enrich.deferred_calls import DeferredCalls
from enrich.identifiers import Identifier, IdentifierType
from enrich.lookups import Lookup, LookupStatus, SourceResult, SourceState, new_lookup_id
from enrich.services import Services
from enrich.settings import Settings
from enrich.sources import RateLimited, Source, sources_for
from enrich.task_messages import (
    FETCH_TASK,
    FINALIZE_TASK,
    LOOKUP_TASK,
    LookupTask,
    SourceCallTask,
    celery_priority,
    send_task,
)
from enrich.upstream_call import CallResult, Outcome, Paced, guarded_call

log = logging.getLogger("pipeline")


# Company -> the CEP of its address, as this process last merged it: a guess that lets a cached
# lookup read the CEP's entries in the same round trip as the company's (checked before use).
_COMPANY_CEPS: dict[str, str] = {}
COMPANY_CEPS_MAX = 100_000
# Merged results of fully cached lookups by the versions of the entries they came from.
_CACHED_RESULTS: dict[tuple, dict] = {}
CACHED_RESULTS_MAX = 10_000


# A bulk batch's items (enrich/batches/) run below every interactive priority (the API's are 1..10),
# and their calls keep each source's interactive reserve of tokens (rate_limiter.py).
BATCH_PRIORITY = 0


def result_from_cache(entry: CacheEntry) -> SourceResult:
    state = SourceState.OK if entry.found else SourceState.NOT_FOUND
    return SourceResult(
        entry.source,
        state,
        data=entry.data,
        cached=True,
        stale=entry.stale,
        elapsed_ms=0.0,
        origin=entry.origin,  # its record names the entry instead of copying the data
    )


def start_lookup(
    parts: Services, identifier: Identifier, priority: int = 5, refresh: bool = False
) -> tuple[Lookup, bool]:
    """Answer from cache, join the lookup already running for this identifier, or start one.

    Returns (lookup, created_now).  A fully cached lookup is returned complete, and so is a CPF,
    answered from the number alone without touching Redis (cpf_answers.py).
    """
    began = time.time()
    if identifier.type is IdentifierType.CPF:
        metrics.lookup_finished("cpf", "answered", began)
        return cpf_answers.answer(identifier, priority), True
    settings = parts.settings
    store = parts.lookups
    kind = str(identifier.type)
    sources = [s for s in sources_for(kind, parts.sources) if s.supports(identifier)]
    names = [s.name for s in sources]
    cached, prefetched_cep = {}, None
    if not refresh:
        # The company's CEP (for the cross-check) is read in the same round trip when this process
        # has seen the company before; `_company_cep` uses it only if the merged CEP is the same.
        guess = _COMPANY_CEPS.get(identifier.value) if kind == "cnpj" else None
        reads = [(kind, names, identifier.value)] + (
            [("cep", _cep_source_names(parts.sources), guess)] if guess else []
        )
        answers = parts.cache.read(reads)
        cached = answers[0]
        prefetched_cep = (guess, answers[1]) if guess else None
    now = time.time()
    lookup = Lookup(
        id=new_lookup_id(),
        type=kind,
        identifier=identifier.value,
        priority=priority,
        status=LookupStatus.QUEUED,
        created_at=now,
        deadline_at=now + settings.lookup_deadline,
        sources={name: SourceResult(name, SourceState.PENDING) for name in names},
    )
    lookup.sources.update({name: result_from_cache(entry) for name, entry in cached.items()})

    if len(cached) == len(names):
        lookup.status = LookupStatus.COMPLETE
        lookup.completed_at = now
        lookup.result, versions = _cached_result(parts, lookup, cached, prefetched_cep)
        store.create_answered(lookup, versions)
        metrics.lookup_finished(kind, "cached", began)
        return lookup, True

    missing = [name for name in names if name not in cached]
    lookup.tasks = {name: uuid.uuid4().hex for name in missing}
    # The record first, then the single-flight claim: a lookup that holds the claim always has its
    # record, so a concurrent request never mistakes a claim for a stale one and starts a second.
    # Its deadline rides along (a lookup that joins another instead finds no record at its deadline).
    deadline = _deadline_call(lookup.id, priority)
    running = store.create(
        lookup,
        claim=True,
        also=lambda pipe: parts.deferred.add(lookup.deadline_at, *deadline, pipe=pipe),
    )
    if running is not None:
        joined = store.get(running)
        # A person does not join a batch item's lookup: its calls run at the lowest priority and
        # skip a source rather than touch the interactive reserve.  Theirs runs beside it.
        if joined is not None and not (joined.priority == BATCH_PRIORITY < priority):
            store.discard(lookup)
            _cancel_deadline(parts.deferred, lookup.id, priority)
            # Shared work, not a shared identity: this request gets an id, priority and call ids of
            # its own (an alias), so it never learns who else asked or when.
            return store.create_alias(lookup.id, joined, priority, now), False
    # One task calls every missing source at once (call_pool); a source's own call id becomes
    # the Celery task id of that source's call whenever it runs on its own (a wait, a retry).
    _send_lookup_task(parts, LookupTask(lookup.id, kind, identifier.value, priority, lookup.tasks))
    return lookup, True


def _send_lookup_task(parts: Services, task: LookupTask) -> None:
    send_task(
        parts,
        LOOKUP_TASK,
        task.args(),
        {"task_id": uuid.uuid4().hex, "priority": celery_priority(task.priority)},
    )


def _cached_result(
    parts: Services, lookup: Lookup, cached: dict[str, CacheEntry], prefetched_cep: tuple | None
) -> tuple[dict, tuple | None]:
    """The merged result and checks of a lookup answered whole from the cache (never calls an upstream),
    and the versions of the entries it came from (None when it depends on more than those).

    The same cached entries always merge the same way, so the result is kept per process by the
    entries' identity (source, fetch time): a hot identifier is merged once, not on every request.
    """
    versions = tuple((name, entry.fetched_at) for name, entry in cached.items())
    if prefetched_cep:
        versions += (prefetched_cep[0], *((name, e.fetched_at) for name, e in prefetched_cep[1].items()))
    key = (lookup.type, lookup.identifier, versions)
    result = _CACHED_RESULTS.get(key)
    if result is not None:
        return result, key
    result = _merged_result(parts, lookup, fetch_cep=False, prefetched_cep=prefetched_cep)
    cep = ((result["data"] or {}).get("endereco") or {}).get("cep") if lookup.type == "cnpj" else None
    # A company whose CEP was not read along with it had its CEP looked up apart: not kept.
    if cep is not None and not (prefetched_cep and prefetched_cep[0] == cep):
        return result, None
    if len(_CACHED_RESULTS) >= CACHED_RESULTS_MAX:
        _CACHED_RESULTS.clear()
    _CACHED_RESULTS[key] = result
    return result, key


def _deadline_call(lookup_id: str, priority: int) -> tuple[str, list, dict, str]:
    """The lookup's finalize at its deadline, as (task, args, options, call id) for the deferred set."""
    return FINALIZE_TASK, [lookup_id, True], {"priority": celery_priority(priority)}, f"deadline:{lookup_id}"


def _cancel_deadline(deferred: DeferredCalls, lookup_id: str, priority: int) -> None:
    task, args, options, call_id = _deadline_call(lookup_id, priority)
    deferred.cancel(call_id, task, args, options)


def _backoff(settings: Settings, attempt: int) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    delay = min(settings.retry_backoff_max, settings.retry_backoff_base * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def settle(parts: Services, lookup_id: str, result: SourceResult, replace_settled: bool = False) -> bool:
    """Record a source's state, publish it, and finalize when it was the last one; True if applied."""
    result = dataclasses.replace(result, updated_at=round(time.time(), 3))
    applied, newly, done, total = parts.lookups.set_source(lookup_id, result, replace_settled)
    if not applied:
        if total > 0 and done == total:
            # A task redelivered after its worker died between settling the last source and
            # finalizing: finish the lookup now rather than at its deadline (finalize is idempotent).
            finalize(parts, lookup_id)
        return False
    published = [("source", result.to_dict())]
    if newly:
        published.append(("progress", {"done": done, "total": total}))
    parts.events.publish_many(lookup_id, published)
    if newly and done == total:
        finalize(parts, lookup_id)
    return True


def run_source_call(
    parts: Services, task: SourceCallTask, *, call_id: str | None = None, settled_checked: bool = False
) -> dict:
    """One call of one source for one lookup: token, then the guarded call, then settle.

    Never sleeps: a call without a token, or waiting for a retry, goes to the deferred set
    and this function returns at once.  Returns a small dict describing what happened.
    `call_id`: the id its later sends get (the running task's, or the source's call id); `settled_checked`:
    the caller has just seen this source unsettled.  A batch item's call skips the source rather
    than wait past BATCH_SOURCE_WAIT from `task.held_since` (`_SourceCall.batch_wait`).  Its log
    lines name the lookup, the source and the source's own task id (as /api/lookups reports it).
    """
    with log_setup.bind(lookup_id=task.lookup_id, source=task.source, task_id=call_id):
        if task.kind == IdentifierType.CPF:
            return _dropped_cpf_call(task.lookup_id)
        if not task.requeue and not settled_checked and parts.lookups.is_settled(task.lookup_id, task.source):
            # A redelivered task (its worker died after settling): the lookup may still need its
            # finalize, which that worker never reached.  finalize does nothing unless all settled.
            finalize(parts, task.lookup_id)
            return {"source": task.source, "state": "already_settled"}
        call = _SourceCall(parts, task, call_id)
        if not task.reserved:
            stopped = call.reserve()
            if stopped is not None:
                return stopped
        return call.fetch()


class _SourceCall:
    """One run of `run_source_call`: reserving its token, the guarded call (upstream_call.py), and
    one method per outcome, each recorded as the source's state."""

    def __init__(self, parts: Services, task: SourceCallTask, call_id: str | None) -> None:
        self.parts, self.task = parts, task
        self.lookup_id, self.source_name, self.kind, self.value = (
            task.lookup_id,
            task.source,
            task.kind,
            task.value,
        )
        self.attempt, self.requeue, self.held_since = task.attempt, task.requeue, task.held_since
        self.batch = task.priority == BATCH_PRIORITY
        self.settings = parts.settings
        self.limiter = parts.rate_limiter
        self.task_id = call_id
        self.options = task.options(self.task_id)
        # A call whose token was reserved ahead runs when its slot has come: it jumps the queue
        # (0 is served first), since a slot spent waiting behind new work bunches calls up later.
        self.slot_options = task.options(self.task_id, priority=0)
        self.started = 0.0

    def defer(self, due: float, options: dict, rate_limit_wait: bool = False, **changes: object) -> None:
        """Send this call again at `due` (the deferred set), with `changes` to its task."""
        again = dataclasses.replace(self.task, held_since=self.held_since, **changes)
        self.parts.deferred.add(due, FETCH_TASK, again.args(), options, rate_limit_wait=rate_limit_wait)

    # -- outcomes ------------------------------------------------------------------------------
    def record(self, result: SourceResult) -> dict:
        log.info(  # one line per call of a source
            "source %s: %s (%s ms, attempt %d)",
            self.source_name,
            result.state,
            result.elapsed_ms,
            result.attempts,
            extra={"state": str(result.state), "elapsed_ms": result.elapsed_ms, "attempts": result.attempts},
        )
        if not settle(self.parts, self.lookup_id, result, replace_settled=self.requeue) and self.requeue:
            masked = log_redaction.mask_identifier(self.kind, self.value)
            log.info(
                "requeued call of %s for %s finished; lookup %s is gone",
                self.source_name,
                masked,
                self.lookup_id,
            )
        return {k: v for k, v in result.to_dict().items() if k != "data"}

    def result(self, state: SourceState, attempts: int | None = None, **fields) -> dict:
        """Record the call's outcome after it went out (its elapsed time, this attempt counted).

        Data with an `origin` (the cache entry the call wrote) is named there by the record
        rather than copied."""
        attempts = self.attempt + 1 if attempts is None else attempts
        elapsed = round((time.perf_counter() - self.started) * 1000, 1)
        return self.record(
            SourceResult(self.source_name, state, elapsed_ms=elapsed, attempts=attempts, **fields)
        )

    def rate_limited(self, error: str, scheduled_at: float | None = None) -> dict:
        """Settled (no `scheduled_at`) or waiting for its time; either way no request went out."""
        return self.record(
            SourceResult(
                self.source_name,
                SourceState.RATE_LIMITED,
                scheduled_at=scheduled_at,
                attempts=self.attempt,
                error=error,
            )
        )

    # -- waits ---------------------------------------------------------------------------------
    def batch_wait(self, wait: float) -> tuple[float, dict | None]:
        """A batch call about to wait `wait` s for its source's rate limit (a token above the
        reserve, or room in the log of starts): (its due time, None), or its skip when it would
        then have waited past BATCH_SOURCE_WAIT since it was first held.  Every wait a batch call
        can meet goes through here, so one cap holds for them all, however they follow each other.
        """
        now = time.time()
        self.held_since = self.held_since or now
        due = now + wait
        if due - self.held_since <= self.settings.batch_source_wait:
            return due, None
        metrics.rate_limit_delay(self.source_name, "exhausted", wait)
        skipped = self.rate_limited(
            f"skipped: the source's tokens are kept for interactive lookups (next one in {wait:.1f}s)"
        )
        return due, skipped

    def wait_for_slot(self, due: float) -> dict:
        # A batch call's hold goes on counting from when it began (`held_since`).  A person's call
        # is sent a little ahead of its time (the limiter's `send_lead`) to wait at its send slot,
        # which holds it to its time on the wire, rather than reach the upstream late.
        lead = 0.0 if self.batch else self.limiter.send_lead(self.source_name)
        self.defer(due - lead, self.slot_options, rate_limit_wait=True, reserved=True, token_at=due)
        return self.rate_limited("waiting for the source's rate limit", due)

    def reserve(self) -> dict | None:
        """Take the call's token; None when it may go now, else what it settled or waits as."""
        reservation = self.limiter.reserve(self.source_name, batch=self.batch)
        if reservation.held:
            # A batch call that would eat into the interactive reserve: ask again when a token
            # beyond it should exist, without holding one, or skip this source past its wait.
            due, skipped = self.batch_wait(reservation.wait)
            if skipped is not None:
                return skipped
            self.defer(due, self.options, rate_limit_wait=True, reserved=False)
            return self.rate_limited("waiting: the source's tokens are kept for interactive lookups", due)
        if not reservation.granted:
            metrics.rate_limit_delay(self.source_name, "exhausted", reservation.wait)
            return self.rate_limited(
                f"quota exhausted: next call possible in {reservation.wait:.0f}s, past the "
                f"{self.settings.defer_horizon:.0f}s horizon"
            )
        if reservation.wait > 0:
            metrics.rate_limit_delay(self.source_name, "reserved", reservation.wait)
            return self.wait_for_slot(time.time() + reservation.wait)
        return None

    # -- the call ------------------------------------------------------------------------------
    def fetch(self) -> dict:
        """The guarded call (breaker, admission, fetch, cache write), then what came of it."""
        if not self.requeue:
            settle(
                self.parts,
                self.lookup_id,
                SourceResult(self.source_name, SourceState.RUNNING, attempts=self.attempt + 1),
            )
        self.started = time.perf_counter()
        identifier = Identifier(type=IdentifierType(self.kind), value=self.value)
        call = guarded_call(
            self.parts, self.source_name, identifier, batch=self.batch, not_before=self.task.token_at
        )
        if call.outcome is Outcome.OK:
            if self.kind == "cnpj":
                _start_cep_fetch(self.parts, ((call.data or {}).get("endereco") or {}).get("cep"), self.batch)
            return self.result(SourceState.OK, data=call.data, origin=call.origin)
        if call.outcome is Outcome.NOT_FOUND:
            return self.result(SourceState.NOT_FOUND, error=call.message)
        if call.outcome is Outcome.REJECTED:
            return self.result(SourceState.ERROR, error=call.message)
        if call.outcome is Outcome.PACED:
            return self.paced(call.error)
        if call.outcome is Outcome.CIRCUIT_OPEN:
            return self.circuit_open(call.error)
        return self.failed(call)

    def paced(self, paced: Paced) -> dict:
        # Calls that ran late bunched up: as many started in the last second (or minute) as the
        # limit allows (for a batch call, as leaves the reserve of starts).  Keep the token and go
        # a little later, ahead of new work; a batch call only within BATCH_SOURCE_WAIT of its hold.
        if self.batch:
            due, skipped = self.batch_wait(paced.wait)
            if skipped is not None:
                return skipped
        else:
            due = time.time() + paced.wait
        metrics.rate_limit_delay(self.source_name, "paced", paced.wait)
        return self.wait_for_slot(due)

    def circuit_open(self, error: BreakerOpen) -> dict:
        """The breaker refused the call: a stale copy if the cache keeps one, else `circuit_open`."""
        stale = self.parts.cache.get_stale(self.kind, self.source_name, self.value)
        if stale is not None:
            state = SourceState.STALE if stale.found else SourceState.NOT_FOUND
            return self.result(
                state,
                attempts=self.attempt,
                data=stale.data,
                cached=True,
                stale=True,
                error="circuit open; serving a stale copy",
                origin=stale.origin,
            )
        until = (
            f" until {time.strftime('%H:%M:%S', time.gmtime(error.retry_at))} UTC" if error.retry_at else ""
        )
        return self.result(
            SourceState.CIRCUIT_OPEN, attempts=self.attempt, error=f"circuit open{until}; no stale copy"
        )

    def failed(self, call: CallResult) -> dict:
        """A transient failure: retried after a backoff, or past RETRY_MAX a dead letter."""
        message, error = call.message, call.error
        attempts = self.attempt + 1
        if attempts > self.settings.retry_max:
            self.parts.dead_letters.add(
                self.lookup_id, self.source_name, self.kind, self.value, self.task.priority, message, attempts
            )
            return self.result(SourceState.ERROR, error=f"gave up after {attempts} attempts: {message}")
        delay = _backoff(self.settings, self.attempt)
        if isinstance(error, RateLimited) and error.retry_after:
            delay = max(delay, error.retry_after)
        due = time.time() + delay
        # A retry is not a hold: it carries no `held_since`.
        self.parts.deferred.add(
            due,
            FETCH_TASK,
            dataclasses.replace(
                self.task, attempt=attempts, reserved=False, held_since=0.0, token_at=0.0
            ).args(),
            self.options,
        )
        return self.result(SourceState.RETRYING, scheduled_at=due, error=message)


def run_lookup_calls(parts: Services, task: LookupTask) -> dict:
    """The lookup task: call every source named in `task.call_ids` at once, each as `run_source_call`.

    Returns each source's outcome.  A source already settled (the task was redelivered after
    its worker died) is not called again; the lookup is finalized if that was all it needed.
    """
    if task.kind == IdentifierType.CPF:
        return _dropped_cpf_call(task.lookup_id)
    unsettled = parts.lookups.unsettled(task.lookup_id, list(task.call_ids))
    if not unsettled:
        finalize(parts, task.lookup_id)
        return {}
    size = _call_pool_size(parts.settings)
    calls = {
        name: call_pool.submit(
            size,
            run_source_call,
            parts,
            SourceCallTask(task.lookup_id, name, task.kind, task.value, task.priority),
            call_id=task.call_ids[name],
            settled_checked=True,
        )
        for name in unsettled
    }
    return {name: call.result() for name, call in calls.items()}


def _dropped_cpf_call(lookup_id: str) -> dict:
    """A CPF call an earlier version queued, deferred or dead-lettered: never sent (cpf_answers.py);
    beat's cleanup deletes its lookup."""
    log.warning("dropped a CPF source call of lookup %s: CPFs are answered from the number alone", lookup_id)
    return {"state": "dropped"}


def _call_pool_size(settings: Settings) -> int:
    # Every lookup task of the worker's pool may have all its sources and one CEP fetch running.
    return max(4, settings.worker_concurrency * 4)


def _start_cep_fetch(parts: Services, cep: str | None, batch: bool = False) -> None:
    """A company source named its CEP: fetch that CEP for the final cross-check now, not at the end."""
    # The fetch hands its answer to finalize through the cache: with the cache off it would only
    # be a second call of the CEP source.
    if not cep or not parts.settings.cep_prefetch or not parts.cache.enabled:
        return
    size = _call_pool_size(parts.settings)
    call_pool.start_cep_fetch(
        cep, lambda: call_pool.submit(size, _company_cep, parts, cep, wait_running=False, batch=batch)
    )


def _cep_source_names(sources: dict[str, Source]) -> list[str]:
    return [s.name for s in sources_for("cep", sources)]


def _company_cep(
    parts: Services,
    cep: str,
    fetch: bool = True,
    prefetched: dict[str, CacheEntry] | None = None,
    wait_running: bool = True,
    batch: bool = False,
) -> tuple[dict | None, str | None]:
    """The CEP data for a company's address: from cache, else (with `fetch`) one call to a CEP source now.

    `prefetched`: this CEP's cache entries, already read along with the company's.  `batch`: for a
    batch item, whose calls keep the interactive reserve of tokens.
    """
    cache = parts.cache
    sources = sources_for("cep", parts.sources)
    if prefetched is None and fetch and wait_running:
        # The fetch this process started when a company source named the CEP: its answer lands
        # in the cache, so wait for it rather than call the CEP source a second time.
        call_pool.wait_for_cep_fetch(cep, max(s.settings.timeout for s in sources) + 1)
    entries = prefetched if prefetched is not None else cache.get_many("cep", [s.name for s in sources], cep)
    found = [e for e in entries.values() if e.found]
    if found:
        return found[0].data, None
    if entries and len(entries) == len(sources):
        return None, "not_found"
    if not fetch:
        return None, "the CEP is not cached yet"
    identifier = Identifier(type=IdentifierType.CEP, value=cep)
    last_error = "no CEP source available"
    for source in sources:
        if source.name in entries:
            continue
        # A token now or not at all: the cross-check does not wait for a rate limit.
        if not parts.rate_limiter.reserve(source.name, horizon=0, batch=batch).granted:
            last_error = f"{source.name} is rate limited"
            continue
        call = guarded_call(parts, source.name, identifier, batch=batch)
        if call.outcome is Outcome.OK:
            return call.data, None
        if call.outcome is Outcome.NOT_FOUND:
            return None, "not_found"
        if call.outcome is Outcome.PACED:
            last_error = f"{source.name} is rate limited"
        else:  # the error's own words (an unreadable breaker state says so itself)
            last_error = f"{source.name}: {getattr(call.error, 'message', call.error)}"
    return None, last_error


def _merged_result(
    parts: Services, lookup: Lookup, fetch_cep: bool = True, prefetched_cep: tuple | None = None
) -> dict:
    merged = cross_checks.merge(lookup.type, lookup.sources)
    checks = cross_checks.agreement_checks(lookup.type, lookup.sources)
    if lookup.type == "cnpj":
        cep = ((merged or {}).get("endereco") or {}).get("cep")
        if cep:
            if len(_COMPANY_CEPS) >= COMPANY_CEPS_MAX:
                _COMPANY_CEPS.clear()
            _COMPANY_CEPS[lookup.identifier] = cep
        prefetched = prefetched_cep[1] if prefetched_cep and prefetched_cep[0] == cep else None
        batch = lookup.priority == BATCH_PRIORITY
        cep_data, cep_error = (
            _company_cep(parts, cep, fetch_cep, prefetched, batch=batch) if cep else (None, None)
        )
        checks = cross_checks.company_checks(merged, cep_data, cep_error) + checks
    return {"data": merged, "checks": checks}


# A complete lookup none of whose sources gave an answer (data, "not found" or a stale copy) failed.
_ANSWERED = frozenset({SourceState.OK, SourceState.NOT_FOUND, SourceState.STALE})


def _outcome(lookup: Lookup, status: LookupStatus) -> str:
    if status == LookupStatus.PARTIAL:
        return "partial"
    return "complete" if any(r.state in _ANSWERED for r in lookup.sources.values()) else "failed"


def finalize(parts: Services, lookup_id: str, at_deadline: bool = False) -> str | None:
    """Merge and cross-check; `complete` once every source settled, `partial` at the deadline.

    Returns the status it set, or None if there was nothing to do.
    """
    store = parts.lookups
    lookup = store.get(lookup_id)
    if lookup is None or lookup.status == LookupStatus.COMPLETE:
        return None
    all_settled = lookup.done == len(lookup.sources)
    if not all_settled and (not at_deadline or lookup.status == LookupStatus.PARTIAL):
        return None
    status = LookupStatus.COMPLETE if all_settled else LookupStatus.PARTIAL
    lookup.result = _merged_result(parts, lookup)
    # The sources as read back: the result's data is kept as a patch on one they name (lookups.py).
    if not store.finish(lookup_id, status, lookup.result, lookup.sources):
        return None
    if lookup.status != LookupStatus.PARTIAL:  # counted once: the first answer the person gets
        metrics.lookup_finished(lookup.type, _outcome(lookup, status), lookup.created_at)
    lookup.status = status
    log.info(
        "lookup %s: %d of %d sources settled",
        status,
        lookup.done,
        len(lookup.sources),
        extra={"lookup_id": lookup_id, "status": str(status)},
    )
    events = parts.events
    if status == LookupStatus.COMPLETE:
        lookup.completed_at = time.time()
        # The person waiting hears first; the housekeeping after it cannot change the answer (a
        # request that joins meanwhile finds the lookup complete).
        ttl = parts.settings.event_log_ttl_after_complete
        events.publish_many(lookup_id, [("complete", lookup.to_dict())], ttl=ttl)
        store.release_inflight(lookup.type, lookup.identifier, lookup_id)
        # Its deadline's finalize would only find it complete: a task and a record read saved.
        _cancel_deadline(parts.deferred, lookup_id, lookup.priority)
    else:
        unsettled = {name: r.to_dict() for name, r in lookup.sources.items() if not r.settled}
        events.publish(lookup_id, "partial", {**lookup.to_dict(), "unsettled": unsettled})
        _resend_if_lost(parts, lookup)
    return str(status)


def _resend_if_lost(parts: Services, lookup: Lookup) -> None:
    """At its deadline, send again the lookup task of a lookup none of whose sources ever started,
    when the broker provably holds no message for it.

    The broker no longer loses a message it hands to a worker (redis_broker takes and records it in
    one step), but a task can still be lost before it reaches the broker: `start_lookup` writes
    the record (and its single-flight claim) and then sends the task, so a web process killed
    between the two, or a send that failed, leaves a lookup that every later request would join
    and that would stay `partial` with every source `pending` for good.  "Provably": no message
    queued or taken by a worker and not acknowledged names it (redis_broker.messages_naming); a
    backlog of more than redis_broker.SCAN_MAX messages is left alone (it is not read at every deadline,
    and a message for it may be among them).  A batch item's lookup is sent again the same way by
    its batch's step (the batch runner).
    """
    if not never_started(lookup):
        return
    named = redis_broker.messages_naming(parts.redis, parts.settings.key_prefix, {lookup.id})
    if named is None or lookup.id in named:
        return
    log.warning(
        "lookup %s: no source started by its deadline and no message for it on the broker; sending its task again",
        lookup.id,
        extra={"lookup_id": lookup.id},
    )
    send_again(parts, lookup)


def never_started(lookup: Lookup) -> bool:
    """Whether a lookup has sources left to settle and none of them ever started (all `pending`):
    its task never ran."""
    unsettled = [result for result in lookup.sources.values() if not result.settled]
    return bool(unsettled) and all(result.state == SourceState.PENDING for result in unsettled)


def send_again(parts: Services, lookup: Lookup) -> None:
    """Send the lookup task of a lookup record (not an alias: its call ids are the record's) again
    for its unsettled sources.  The caller has made sure that no message for it is left anywhere:
    `_resend_if_lost` at its deadline, a batch's step for an item's lookup that never started
    (the batch runner)."""
    unsettled = [name for name, result in lookup.sources.items() if not result.settled]
    call_ids = {name: lookup.tasks[name] for name in unsettled}
    _send_lookup_task(parts, LookupTask(lookup.id, lookup.type, lookup.identifier, lookup.priority, call_ids))


def requeue_dead_letter(parts: Services, entry_id: str) -> dict | None:
    """Take a dead letter off the list and send its call again as a new, registered task.

    Returns the entry with the new `task_id`, or None for an unknown id (the admin API and
    `flask dead-letters requeue` both call this).  The call replaces the source's settled answer.
    """
    entry = parts.dead_letters.mark_requeued(entry_id)
    if entry is None:
        return None
    task_id = uuid.uuid4().hex
    parts.lookups.register_task(task_id, FETCH_TASK, entry["lookup_id"], entry["source"])
    call = SourceCallTask(
        entry["lookup_id"],
        entry["source"],
        entry["type"],
        entry["identifier"],
        entry["priority"],
        requeue=True,
    )
    send_task(parts, FETCH_TASK, call.args(), call.options(task_id))
    return {**entry, "task_id": task_id}
