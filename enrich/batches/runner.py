"""Running bulk batches: creating one and sending its steps, starting its items as lookups, settling them.

A batch's items already cached settle when it is created.  The rest wait in the batch's queue and
are started as ordinary lookups (pipeline.start_lookup) at BATCH_PRIORITY, a few at a time: a
*step* task (job_queue.batch_step, every BATCH_POLL_INTERVAL while the batch runs) collects the
answers of the items in flight and starts new ones while the cluster holds fewer than
BATCH_CONCURRENCY batch items in flight.  Feeding them this way, not queueing 10,000 tasks at once,
is what keeps interactive lookups fast: the broker never holds more batch work than a few worker
threads, a cancel only has to empty the batch's queue, and an item's lookup deadline starts when it
really starts.  Its source calls also keep each source's interactive reserve of tokens
(rate_limiter.py) and skip a source they would wait for (a token, room in its log of starts) past
BATCH_SOURCE_WAIT from when they were first held.

An item settles from its lookup once that is complete (a lookup `partial` at its deadline still
completes when its last source settles), so its row shows the lookup's final state and sources,
and a batch is complete only when nothing will change.  A worker killed mid-call leaves its
sources `running` until the broker sends its task again, VISIBILITY_TIMEOUT plus up to one sweep
after it took it.  So an item is given up only when its lookup's work is lost for good: nothing
happened to the lookup for `item_limit` seconds (BATCH_ITEM_TIMEOUT, never less than a redelivery
takes) counted from its last sign of work (the item's start, the latest state a source recorded: a
source goes `running` when its call really starts, again when a redelivered task reruns it; or a
waiting call's due time), and no task of it is left to run (queued, taken by a worker and not
acknowledged, or deferred).  It then settles `failed` (`partial` if some source gave data) with a
reason saying so, each source that never answered shown as an `error`; but a lookup none of whose
sources ever started is not lost, only never sent (Redis lost inside a step, between writing its
record and sending its task; the item, started again, joins that record): its task is sent again
and the item waits for it.

A step chain that breaks (a worker lost with the step) is repaired by `kick_if_stalled`, which the
routes and the command line call when they read a batch's status and the health check calls for
every batch not finished: reading the store itself never sends anything.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from enrich import cross_checks, pipeline, redis_broker
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.batches.record import item_key
from enrich.batches.store import InFlight
from enrich.identifiers import Identifier, IdentifierType
from enrich.lookups import Lookup, LookupStatus
from enrich.services import Services
from enrich.sources import sources_for
from enrich.task_messages import celery_priority, send_task

log = logging.getLogger("batches")

STEP_TASK = "job_queue.batch_step"
CACHE_READ_CHUNK = 200  # identifiers whose cache entries are read in one round trip at creation
# One step at a time per batch: a step takes milliseconds, and two that overlap once its lock
# lapses change counts only through the store's scripts, so a step cut off by a lost worker or
# Redis (its lock left behind) holds the batch up for this long at most.
STEP_LOCK_SECONDS = 5
LOST_CHECK_SECONDS = 5.0  # how often a step may read the broker for an overdue item's tasks (`_owed`)
STALL_SECONDS = 10.0  # a running batch with no step for this long gets one (a lost worker took it)


def _identifier(key: str) -> Identifier:
    kind, _, value = key.partition(":")
    return Identifier(type=IdentifierType(kind), value=value)


def _last_sign_of_work(lookup: Lookup, started: float) -> float:
    """When an item's lookup last showed its work alive: the item's start, the latest state one of
    its sources recorded (a source goes `running` when its call really starts, and again when a
    redelivered task reruns it), or the due time of a call waiting in the deferred set."""
    times = [started]
    for result in lookup.sources.values():
        times += [t for t in (result.updated_at, result.scheduled_at) if t]
    return max(times)


class BatchRunner:
    """Moves batches along: their steps, their items' lookups, their progress events.

    `links(batch_id)` gives the links a status shows (the web routes' paths, handed in by
    `create_app`): the statuses this runner returns and publishes carry them.
    """

    def __init__(self, parts: Services, links: Callable[[str], dict[str, str]]) -> None:
        self.parts = parts
        self.store = parts.batches
        self.redis = parts.redis
        self.settings = parts.settings
        self.links = links

    # -- creating and reading ------------------------------------------------------------------
    def create(self, parsed: batch_input.ParsedBatch, name: str = "", client: str = "cli") -> dict:
        """Create the batch (BatchStore.create) with its items already cached settled, and send its
        first step when any item waits; its status, with links, plus `cancel_token` (shown once)."""
        looked_up = [identifier for identifier in parsed.unique if identifier.type is not IdentifierType.CPF]
        created = self.store.create(parsed, name, client, cached=self._cached_summaries(looked_up))
        if created["counts"]["pending"]:
            self.kick(created["id"])
        cancel_token = created.pop("cancel_token")
        return {**created, "links": self.links(created["id"]), "cancel_token": cancel_token}

    def _cached_summaries(self, unique: list[Identifier]) -> dict[str, dict]:
        """Items every source of which is cached: settled now, from the cache alone (no lookup record)."""
        all_sources, cache = self.store.sources, self.parts.cache
        summaries: dict[str, dict] = {}
        for start in range(0, len(unique), CACHE_READ_CHUNK):
            chunk = unique[start : start + CACHE_READ_CHUNK]
            names = [[s.name for s in sources_for(str(i.type), all_sources) if s.supports(i)] for i in chunk]
            answers = cache.read([(str(i.type), n, i.value) for i, n in zip(chunk, names, strict=True)])
            for identifier, wanted, entries in zip(chunk, names, answers, strict=True):
                if not wanted or len(entries) < len(wanted):
                    continue
                results = {name: pipeline.result_from_cache(entries[name]) for name in wanted}
                kind = str(identifier.type)
                data = cross_checks.merge(kind, results)
                summaries[item_key(identifier)] = batch_rows.summarize(kind, results, data, True, None)
        return summaries

    def status(self, batch_id: str) -> dict | None:
        """The body of `GET /api/batches/<id>` (the store's status and the links); None when unknown.
        Reads only: a caller that shows it to someone also calls `kick_if_stalled`."""
        status = self.store.status(batch_id)
        return None if status is None else {**status, "links": self.links(batch_id)}

    # -- sending steps -------------------------------------------------------------------------------
    def kick(self, batch_id: str) -> None:
        """Send the batch's step now (it runs at the lowest priority, like the items)."""
        send_task(self.parts, STEP_TASK, [batch_id], {"priority": celery_priority(pipeline.BATCH_PRIORITY)})

    def shown_status(self, batch_id: str) -> dict | None:
        """`status` for someone who asked (the API, the CLI): a batch whose steps stopped also gets
        one, as the README says, from the same read."""
        status, last = self.store.status_and_last_step(batch_id)
        if status is None:
            return None
        self._kick_if_idle(batch_id, last)
        return {**status, "links": self.links(batch_id)}

    def kick_if_stalled(self, batch_id: str) -> bool:
        """A batch not finished whose step chain broke (a worker lost with it: no step for
        STALL_SECONDS) gets a new step, once per STALL_SECONDS (`:kicked`); True when one was sent."""
        return self._kick_if_idle(batch_id, self.store.last_step_at(batch_id))

    def _kick_if_idle(self, batch_id: str, last: float | None) -> bool:
        if last is None:
            return False
        idle = time.time() - last
        if idle <= max(STALL_SECONDS, self.settings.batch_poll_interval * 50):
            return False
        if not self.redis.set(self.store.key(batch_id, "kicked"), 1, nx=True, ex=int(STALL_SECONDS)):
            return False
        log.warning("batch %s: no step for %.0f s; sending one", batch_id, idle)
        self.kick(batch_id)
        return True

    def kick_stalled(self) -> int:
        """The health check's repair: `kick_if_stalled` for every batch not finished; returns how many
        batches are not finished."""
        running = self.store.running_ids()
        for batch_id in running:
            self.kick_if_stalled(batch_id)
        return len(running)

    def cancel(self, batch_id: str) -> str | None:
        """Cancel the items not started yet (those in flight finish), publish the progress and, when
        nothing is in flight, the end; the batch's status after, or None when unknown."""
        status = self.store.cancel(batch_id)
        if status == "cancelled":
            self._publish_progress(batch_id)
            self._finish_if_done(batch_id)
        return status

    # -- the step ------------------------------------------------------------------------------------
    def step(self, batch_id: str) -> str:
        """Collect answers of the items in flight, start new ones, publish progress; reschedule.

        Runs in a worker (job_queue.batch_step).  One step per batch at a time (a lock); the
        step that holds it schedules the next one.  Returns what it did (for the task's log).
        """
        lock = self.store.key(batch_id, "step")
        token = secrets.token_hex(8)
        if not self.redis.set(lock, token, nx=True, ex=STEP_LOCK_SECONDS):
            self._schedule_step(batch_id)  # the step holding the lock may be the one that ends the chain
            return "busy"
        try:
            phase, before = self.store.counts_if_open(batch_id)
            if phase == "gone":
                return "gone"
            if phase == "finished":
                return "finished"  # a step left over from a kick: the chain ends here
            self._collect(batch_id)
            self._start_items(batch_id)
            after = self.store.note_step(batch_id)
            if after != before:
                self._publish_progress(batch_id)
            if self._finish_if_done(batch_id):
                return "finished"
        finally:
            if self.redis.get(lock) == token.encode():
                self.redis.delete(lock)
        self._schedule_step(batch_id)
        return "stepped"

    def _schedule_step(self, batch_id: str) -> None:
        # One deferred entry per batch (the same call id, task and args make the same member): a
        # second chain started by a kick merges into this one instead of doubling the steps.
        self.parts.deferred.add(
            time.time() + self.settings.batch_poll_interval,
            STEP_TASK,
            [batch_id],
            {"priority": celery_priority(pipeline.BATCH_PRIORITY)},
            call_id=f"batch-step:{batch_id}",
        )

    @property
    def item_limit(self) -> float:
        """Seconds an item in flight waits with no sign of its lookup's work before that work may be
        lost: BATCH_ITEM_TIMEOUT, but never less than VISIBILITY_TIMEOUT plus two of the broker's
        sweeps for unacknowledged tasks (one for the sweep, one for the task sent again to start),
        so an item whose task is owed a redelivery waits for it (see the module's docstring)."""
        return max(
            self.settings.batch_item_timeout,
            self.settings.visibility_timeout
            + 2 * redis_broker.sweep_interval(self.settings.visibility_timeout),
        )

    def _collect(self, batch_id: str) -> None:
        """Settle the items in flight whose lookups completed, and those whose lookups' work was lost;
        an item claimed by a step that stopped before starting it is started."""
        entries = self.store.in_flight(batch_id)
        if not entries:
            return
        lookups = self.store.lookups
        now = time.time()
        self.store.mark_seen(batch_id, list(entries), now)
        started = {key: item for key, item in entries.items() if item.lookup_id}
        statuses = dict(
            zip(started, lookups.statuses([item.work_id for item in started.values()]), strict=True)
        )
        overdue: dict[str, tuple[Lookup, float]] = {}
        for key, item in entries.items():
            if not item.lookup_id:
                # Claimed by a step that stopped before starting it (a lost worker): start it now.
                self._start(batch_id, key, float(item.started or now))
                continue
            found = self._settle_or_overdue(batch_id, key, item, statuses[key], now)
            if found is not None:
                overdue[key] = found
        # Reading the broker for their tasks costs up to redis_broker.SCAN_MAX messages: once in a while.
        if overdue and self.redis.set(
            self.store.key(batch_id, "lost-check"), 1, nx=True, px=int(LOST_CHECK_SECONDS * 1000)
        ):
            self._settle_lost(batch_id, overdue, now)

    def _settle_or_overdue(
        self, batch_id: str, key: str, item: InFlight, status: LookupStatus | None, now: float
    ) -> tuple[Lookup, float] | None:
        """Settle a started item whose lookup completed (or expired); (its lookup, its last sign of
        work) when nothing happened to that for `item_limit`, for `_settle_lost` to judge."""
        lookups = self.store.lookups
        if status == LookupStatus.COMPLETE:
            lookup = lookups.get(item.lookup_id)
            if lookup is not None:
                self.store.settle(batch_id, key, batch_rows.summary_of(lookup, True))
                return None
        if status is None:
            error = "its lookup expired before it completed"
            self.store.settle(batch_id, key, batch_rows.failed(error, item.lookup_id))
            return None
        started = float(item.started or now)
        if now - started <= self.item_limit:  # its last sign of work is no earlier than that
            return None
        lookup = lookups.get(item.lookup_id)
        since = _last_sign_of_work(lookup, started) if lookup else now
        if lookup is not None and now - since > self.item_limit:
            return lookup, since
        return None

    def _settle_lost(self, batch_id: str, overdue: dict[str, tuple[Lookup, float]], now: float) -> None:
        """Of the items whose lookups did nothing for `item_limit`, settle those no task of which is
        left to run (`_owed` names the rest: they wait, as for a task the broker still owes).

        A lookup none of whose sources ever started is not lost but never sent: its record was
        written and its task was not (Redis lost inside a step, between the two; the step after
        starts the item again and it joins that record, its single flight).  Its deadline sends it
        again only with every queue empty, which a batch's backlog never is; here no message for
        it is left, so it is sent again and the item waits for it."""
        owed = self._owed({lookup.work_id for lookup, _ in overdue.values()})
        lookups = self.store.lookups
        for key, (lookup, since) in overdue.items():
            if lookup.work_id in owed:
                continue
            if lookup.done == len(lookup.sources):
                # Every source settled but the finalize was lost with its worker: finish it here.
                pipeline.finalize(self.parts, lookup.work_id)
                finished = lookups.get(lookup.id)
                if finished is not None and finished.status == LookupStatus.COMPLETE:
                    self.store.settle(batch_id, key, batch_rows.summary_of(finished, True))
                    continue
            work = lookups.get(lookup.work_id) if lookup.shared_id else lookup  # the record: its call ids
            if work is not None and pipeline.never_started(work):
                log.warning(
                    "batch %s: the lookup %s of an item never started and no task of it is left; "
                    "sending its task again",
                    batch_id,
                    work.id,
                    extra={"batch_id": batch_id, "lookup_id": work.id},
                )
                pipeline.send_again(self.parts, work)
                continue
            log.warning(
                "batch %s: the lookup %s of an item did nothing for %.0f s and has no task left; "
                "the item settles without it",
                batch_id,
                lookup.id,
                now - since,
                extra={"batch_id": batch_id, "lookup_id": lookup.id},
            )
            self.store.settle(batch_id, key, batch_rows.lost(lookup, now - since))

    def _owed(self, work_ids: set[str]) -> set[str]:
        """Those of `work_ids` (lookup records) that some task still names: queued on the broker,
        taken by a worker and not acknowledged (running, or lost with its worker and owed a
        redelivery), or waiting in the deferred set.  All of them when there are more than
        redis_broker.SCAN_MAX such tasks to read (a backlog: theirs may be among them)."""
        named = redis_broker.messages_naming(
            self.redis, self.settings.key_prefix, work_ids, redis_broker.SCAN_MAX
        )
        if named is None:
            return set(work_ids)
        waiting = self.parts.deferred.naming(work_ids, redis_broker.SCAN_MAX)
        return set(work_ids) if waiting is None else named | waiting

    def _start_items(self, batch_id: str) -> None:
        now = time.time()
        cap = max(1, self.settings.batch_concurrency)
        for key in self.store.claim(batch_id, cap, now, stale_before=now - self.item_limit * 2):
            self._start(batch_id, key, now)

    def _start(self, batch_id: str, key: str, started: float) -> None:
        lookup, _ = pipeline.start_lookup(self.parts, _identifier(key), pipeline.BATCH_PRIORITY)
        if lookup.status == LookupStatus.COMPLETE:  # cached since the batch was created
            self.store.settle(batch_id, key, batch_rows.summary_of(lookup, True))
        else:
            self.store.mark_started(batch_id, key, lookup.id, started, lookup.shared_id)

    # -- progress ------------------------------------------------------------------------------------
    def _finish_if_done(self, batch_id: str) -> bool:
        if not self.store.finish_if_done(batch_id):
            return False
        status = self.status(batch_id)
        if status is not None:
            log.info(
                "batch %s %s: %s",
                batch_id,
                status["status"],
                ", ".join(f"{n} {state}" for state, n in status["counts"].items() if n),
                extra={"batch_id": batch_id, "status": status["status"]},
            )
            self.parts.events.publish(self.store.channel(batch_id), "complete", status)
        return True

    def _publish_progress(self, batch_id: str) -> None:
        status = self.status(batch_id)
        if status is not None:
            self.parts.events.publish(self.store.channel(batch_id), "progress", status)
