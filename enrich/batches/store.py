"""Bulk batches: thousands of identifiers looked up at the lowest priority, with progress and results.

A batch is read by batch_input.py into one entry per input line; its distinct identifiers are
its *items*.  Items already cached settle when the batch is created.  The rest wait in the
batch's queue and are started as ordinary lookups (pipeline.start_lookup) at BATCH_PRIORITY, a
few at a time: a *step* task (job_queue.batch_step, every BATCH_POLL_INTERVAL while the batch
runs) collects the answers of the items in flight and starts new ones while the cluster holds
fewer than BATCH_CONCURRENCY batch items in flight.  Feeding them this way, not queueing
10,000 tasks at once, is what keeps interactive lookups fast: the broker never holds more batch
work than a few worker threads, a cancel only has to empty the batch's queue, and an item's
lookup deadline starts when it really starts.  Its source calls also keep each source's
interactive reserve of tokens (rate_limiter.py) and skip a source they would wait for (a token,
room in its log of starts) past BATCH_SOURCE_WAIT from when they were first held.

An item settles from its lookup once that is complete (a lookup `partial` at its deadline still
completes when its last source settles), so its row shows the lookup's final state and sources,
and a batch is complete only when nothing will change.  A worker killed mid-call leaves its
sources `running` until the broker sends its task again, VISIBILITY_TIMEOUT plus up to one
sweep after it took it.  So an item is given up only when its lookup's work is lost for good:
nothing happened to the lookup for `item_limit` seconds (BATCH_ITEM_TIMEOUT, never less than a
redelivery takes) counted from its last sign of work (the item's start, the latest state a source
recorded: a source goes `running` when its call really starts, again when a redelivered task
reruns it; or a waiting call's due time), and no task of it is left to run (queued, taken by a
worker and not acknowledged, or deferred).  It then settles `failed` (`partial` if some source
gave data) with a reason saying so, each source that never answered shown as an `error`; but a
lookup none of whose sources ever started is not lost, only never sent (Redis lost inside a step,
between writing its record and sending its task; the item, started again, joins that record):
its task is sent again and the item waits for it.

Redis, under `{prefix}:batch:<id>` (all expiring after BATCH_RETENTION):
- the hash itself: status (running|complete|cancelled), times, totals, counts `n:<state>`, and
  `cancel_token_sha256`, the hash of the cancel token its creation returned (never the token);
- `:lines` a list, one JSON `[line, input, item key or "", reason]` per input line, in order;
- `:queue` item keys not started yet; `:running` item key -> "lookup id|started at[|shared id]"
  (the lookup id is the item's own; the shared id is the lookup it joined, when it joined one);
- `:items` item key -> its summary JSON once settled (state, main fields, sources, error).
`{prefix}:batches` indexes batches by creation time; `{prefix}:batches:inflight` holds every
batch's items in flight (the cluster-wide BATCH_CONCURRENCY), each scored by the last step that
saw it in flight (a member no step has seen for twice `item_limit` is dropped: its batch is
gone).  Every change of counts is one
Lua script, so two steps that ever overlap (a redelivered task) cannot count an item twice.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from enrich import cpf_answers, cross_checks, pipeline, redis_broker, redis_store
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.batches.storage import BatchStorage
from enrich.extensions import services
from enrich.identifiers import MAX_INPUT_LENGTH, Identifier, IdentifierType
from enrich.lookups import Lookup, LookupStatus
from enrich.settings import Settings
from enrich.sources import sources_for

log = logging.getLogger("batches")

STEP_TASK = "job_queue.batch_step"
ITEM_STATES = ("pending", "running", "found", "not_found", "partial", "failed", "cancelled")
COUNT_FIELDS = tuple(f"n:{state}" for state in ITEM_STATES)  # the batch hash's counts
SETTLED_STATES = ("found", "not_found", "partial", "failed", "cancelled")
CACHE_READ_CHUNK = 200  # identifiers whose cache entries are read in one round trip at creation
ROWS_CHUNK = 500  # input lines read per round trip while results stream out
# One step at a time per batch: a step takes milliseconds, and two that overlap once its lock
# lapses change counts only through the Lua scripts, so a step cut off by a lost worker or Redis
# (its lock left behind) holds the batch up for this long at most.
STEP_LOCK_SECONDS = 5
LOST_CHECK_SECONDS = 5.0  # how often a step may read the broker for an overdue item's tasks (`_owed`)
MAX_REASON_LENGTH = 200  # what is kept of why a line could not be read
SUMMARY_BYTES = 400  # reserved per queued item for the summary it gets (state, main fields, sources)
STALL_SECONDS = 10.0  # a running batch with no step for this long gets one (a lost worker took it)

# KEYS: batch hash, queue, running, inflight.  ARGV: cluster-wide cap, now, batch id, drop members
# no step has seen in flight since this (their batch is gone), ttl.  Moves up to (cap - in flight)
# keys from the queue into running.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[4])
if room <= 0 then return {} end
local items = redis.call('LPOP', KEYS[2], room)
if not items then return {} end
for _, key in ipairs(items) do
  redis.call('HSET', KEYS[3], key, '|' .. ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3] .. '|' .. key)
end
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('HINCRBY', KEYS[1], 'n:pending', -#items)
redis.call('HINCRBY', KEYS[1], 'n:running', #items)
return items
"""

# KEYS: batch hash, running, items, inflight.  ARGV: item key, summary json, state, inflight member,
# ttl.  Settles an item in flight once (0 when another step already did).  The items hash may be
# made here (no item was cached at creation): it gets the batch's TTL then.
_SETTLE = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[3]) < 0 then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'n:running', -1)
redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[3], 1)
redis.call('ZREM', KEYS[4], ARGV[4])
return 1
"""

# KEYS: batch hash, queue.  ARGV: now.  The items not started yet become cancelled.
# Returns the batch's status after the call ('' when unknown).
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status ~= 'running' then return status end
local left = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'n:pending', -left)
redis.call('HINCRBY', KEYS[1], 'n:cancelled', left)
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
return 'cancelled'
"""

# KEYS: batch hash, the set of unfinished batches.  ARGV: now, batch id.  Marks the batch finished
# once nothing is pending or in flight; returns 1 when this call did (a running batch becomes
# complete, a cancelled one stays cancelled).
_FINISH = """
if redis.call('HGET', KEYS[1], 'finished_at') then return 0 end
local pending = tonumber(redis.call('HGET', KEYS[1], 'n:pending') or '0')
local running = tonumber(redis.call('HGET', KEYS[1], 'n:running') or '0')
if pending > 0 or running > 0 then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'complete')
end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


def item_key(identifier: Identifier) -> str:
    return f"{identifier.type}:{identifier.value}"


def _running_entry(value: str) -> tuple[str, str, str]:
    """An item in flight's (own lookup id, started at, id of the record that does the work)."""
    lookup_id, _, rest = value.partition("|")
    started, _, shared = rest.partition("|")
    return lookup_id, started, shared or lookup_id


def _token_hash(cancel_token: str) -> str:
    """What the batch hash keeps of a cancel token: its SHA-256, hex (a leaked Redis cancels nothing)."""
    return hashlib.sha256(cancel_token.encode()).hexdigest()


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


class BatchStore:
    """Batches in Redis: creation, status, cancel, results, and the step that feeds their items."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)
        self._cancel = client.register_script(_CANCEL)
        self._finish = client.register_script(_FINISH)
        self.storage = BatchStorage(client, settings)

    # -- keys ------------------------------------------------------------------------------
    def key(self, batch_id: str, part: str | None = None) -> str:
        parts = ("batch", batch_id) if part is None else ("batch", batch_id, part)
        return redis_store.key(self.settings, *parts)

    def _keys(self, batch_id: str, *parts: str) -> list[str]:
        return [self.key(batch_id, part or None) for part in parts]

    @property
    def index_key(self) -> str:
        return redis_store.key(self.settings, "batches")

    @property
    def unfinished_key(self) -> str:
        """The ids of the batches not finished: what /api/status, /metrics and the health check read."""
        return redis_store.key(self.settings, "batches", "unfinished")

    @property
    def inflight_key(self) -> str:
        return redis_store.key(self.settings, "batches", "inflight")

    @property
    def ttl(self) -> int:
        return max(1, int(self.settings.batch_retention))

    @staticmethod
    def channel(batch_id: str) -> str:
        """The batch's event log and stream (sse_streaming), beside the lookups' own."""
        return f"batch.{batch_id}"

    # -- creation --------------------------------------------------------------------------
    def create(self, parsed: batch_input.ParsedBatch, name: str = "", client: str = "cli") -> dict:
        """Store a parsed batch, settle its cached items, queue the rest; returns its status plus
        `cancel_token`, the secret `DELETE /api/batches/<id>` needs (in `X-Cancel-Token`).

        Its bytes are reserved first against the caps for all batches and for `client` (its
        address; "cli" for `flask batch run`): batch_storage.StorageFull when there is no room.

        The token is returned here and only here: the batch keeps its hash, and no status, event or
        result shows either.  The id is meant to be shared (progress, results); the token is not.
        """
        batch_id = secrets.token_urlsafe(16)
        cancel_token = secrets.token_urlsafe(16)
        while batch_id.startswith("-"):  # `flask batch status <id>` would read it as an option
            batch_id = secrets.token_urlsafe(16)
        now = time.time()
        unique = parsed.unique
        # A CPF settles now from the number alone, under a key that is not the number: nothing of
        # it is stored but its masked form and what it says of itself (cpf_answers.py).
        cpf_keys = {
            i.value: f"cpf:{n}" for n, i in enumerate(x for x in unique if x.type is IdentifierType.CPF)
        }
        looked_up = [identifier for identifier in unique if identifier.type is not IdentifierType.CPF]
        cached = self._cached_summaries(looked_up)
        queued = [item_key(identifier) for identifier in looked_up if item_key(identifier) not in cached]
        settled = {
            **cached,
            **{cpf_keys[i.value]: batch_rows.cpf_summary(i) for i in unique if i.type is IdentifierType.CPF},
        }
        counts = {state: 0 for state in ITEM_STATES}
        counts["pending"] = len(queued)
        for summary in settled.values():
            counts[summary["state"]] += 1
        valid = len(parsed.lines) - len(parsed.invalid)
        fields = {
            "status": "running",
            "name": cpf_answers.mask_digit_runs(name[:200]),
            "created_at": now,
            "total": len(unique),
            "lines": len(parsed.lines),
            "invalid": len(parsed.invalid),
            "duplicates": valid - len(unique),
            "cached": len(cached),
            "cancel_token_sha256": _token_hash(cancel_token),
            **{f"n:{state}": n for state, n in counts.items()},
        }
        entries = [self._line_entry(entry, cpf_keys) for entry in parsed.lines]
        summaries = {key: orjson.dumps(summary) for key, summary in settled.items()}
        stored = (
            sum(map(len, entries)) + sum(map(len, queued)) + sum(map(len, [*summaries, *summaries.values()]))
        )
        stored += len(queued) * SUMMARY_BYTES  # what each queued item's summary will add once it settles
        self.storage.reserve(batch_id, client, stored + len(orjson.dumps(fields)), self._oldest_created)
        ttl = self.ttl
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key(batch_id), mapping=fields)
            lines_key, queue_key, items_key = self._keys(batch_id, "lines", "queue", "items")
            for start in range(0, len(entries), 1000):
                pipe.rpush(lines_key, *entries[start : start + 1000])
            for start in range(0, len(queued), 1000):
                pipe.rpush(queue_key, *queued[start : start + 1000])
            if summaries:
                pipe.hset(items_key, mapping=summaries)
            for key in (self.key(batch_id), lines_key, queue_key, items_key):
                pipe.expire(key, ttl)
            pipe.zadd(self.index_key, {batch_id: now})
            pipe.sadd(self.unfinished_key, batch_id)
            pipe.execute()
        if not queued:
            self._finish_once(batch_id)
        log.info(
            "batch %s created: %d lines, %d items (%d cached, %d invalid lines)",
            batch_id,
            len(parsed.lines),
            len(unique),
            len(cached),
            len(parsed.invalid),
            extra={"batch_id": batch_id, "items": len(unique), "cached": len(cached)},
        )
        if queued:
            self.kick(batch_id)
        return {**self.status(batch_id), "cancel_token": cancel_token}

    def _oldest_created(self) -> float | None:
        """When the oldest batch still kept was created (None: there is none)."""
        oldest = self.redis.zrange(self.index_key, 0, 0, withscores=True)
        return oldest[0][1] if oldest else None

    @staticmethod
    def _line_entry(
        entry: batch_input.ValidLine | batch_input.InvalidLine, cpf_keys: dict[str, str]
    ) -> bytes:
        """An input line as kept: a CPF (or what looks like one) only masked, its item under `cpf_keys`."""
        if isinstance(entry, batch_input.ValidLine):
            if entry.identifier.type is IdentifierType.CPF:
                masked = cpf_answers.mask_digit_runs(entry.value)
                return orjson.dumps([entry.line, masked, cpf_keys[entry.identifier.value], ""])
            return orjson.dumps([entry.line, entry.value, item_key(entry.identifier), ""])
        # A line it could not read may still hold a CPF (a typo, a prefix, the type column): masked,
        # and cut to what an identifier may be (the rest is no identifier anyway, only bytes).
        value, reason = (
            cpf_answers.mask_digit_runs(text[:limit])
            for text, limit in ((entry.value, MAX_INPUT_LENGTH), (entry.reason, MAX_REASON_LENGTH))
        )
        return orjson.dumps([entry.line, value, "", reason])

    def _cached_summaries(self, unique: list[Identifier]) -> dict[str, dict]:
        """Items every source of which is cached: settled now, from the cache alone (no lookup record)."""
        all_sources = services().sources
        cache = services().cache
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

    # -- reading -----------------------------------------------------------------------------
    def exists(self, batch_id: str) -> bool:
        return len(batch_id) <= 64 and bool(self.redis.exists(self.key(batch_id)))

    def status(self, batch_id: str) -> dict | None:
        """The API body of `GET /api/batches/<id>`; None when unknown or expired."""
        if len(batch_id) > 64:
            return None
        raw = self.redis.hgetall(self.key(batch_id))
        if not raw:
            return None
        values = {k.decode(): v.decode() for k, v in raw.items()}
        counts = {state: max(0, int(values.get(f"n:{state}", 0))) for state in ITEM_STATES}
        total = int(values["total"])
        settled = sum(counts[state] for state in SETTLED_STATES)
        body: dict[str, Any] = {
            "id": batch_id,
            "status": values["status"],
            "name": values.get("name") or None,
            "total": total,
            "lines": int(values["lines"]),
            "invalid_lines": int(values["invalid"]),
            "duplicates": int(values["duplicates"]),
            "cached": int(values.get("cached", 0)),
            "done": settled,
            "counts": counts,
            "created_at": float(values["created_at"]),
            "cancelled_at": float(values["cancelled_at"]) if values.get("cancelled_at") else None,
            "finished_at": float(values["finished_at"]) if values.get("finished_at") else None,
        }
        body.update(self._eta(batch_id, values, counts))
        body["links"] = {
            "self": f"/api/batches/{batch_id}",
            "events": f"/api/batches/{batch_id}/events",
            "results": f"/api/batches/{batch_id}/results",
            "page": f"/batches/{batch_id}",
        }
        if not values.get("finished_at"):
            self._kick_if_stalled(batch_id, values)
        return body

    def _eta(self, batch_id: str, values: dict, counts: dict) -> dict:
        """Seconds left: the items left at the slowest of three paces, and never less than the
        longest wait a held call of an item in flight still has ahead of it.

        The paces: what the sources' rate limits allow (`_rate_limit_pace`); the throughput
        measured lately (the workers, the upstreams' latency, other traffic); and what the items'
        held calls allow.  An item whose call waits for its source's rate limit (a token above the
        reserve, room in the log of starts: at most BATCH_SOURCE_WAIT, then it skips the source)
        keeps its place among the items in flight all that time, so n items in flight whose held
        calls were given W seconds in all get through at most n / (W / n) items a second, taking
        the items to come to meet the waits of those in flight (`_held_calls`).  The first two
        alone said 0.2 s while each item waited ~5 s for ReceitaWS: the rate pace counts only the
        sources an item waits for every time, and the measured one needs seconds of history."""
        left = counts["pending"] + counts["running"]
        if values.get("finished_at") or left == 0:
            return {"eta_seconds": 0.0, "throughput_per_second": None, "rate_limit_per_second": None}
        limit = self._rate_limit_pace(batch_id)
        measured = None
        then_t, then_done = float(values.get("pace_t", 0) or 0), int(values.get("pace_done", 0) or 0)
        now = time.time()
        done_now = sum(counts[state] for state in SETTLED_STATES) - int(values.get("cached", 0))
        if then_t and now - then_t >= 2:
            measured = max(0.0, (done_now - then_done) / (now - then_t))
        in_flight, given, ahead = self._held_calls(batch_id)
        held = in_flight * in_flight / given if given > 0 else None
        paces = [pace for pace in (limit, measured, held) if pace]
        eta = left / min(paces) if paces else None
        if ahead > 0:
            eta = max(eta or 0.0, ahead)
        return {
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "throughput_per_second": round(measured, 3) if measured is not None else None,
            "rate_limit_per_second": round(limit, 3) if limit else None,
        }

    def _rate_limit_pace(self, batch_id: str) -> float | None:
        """Items a second the rate limits allow for what is left, by the types in the queue.

        An item waits for every source of its type that can give it a token within
        BATCH_SOURCE_WAIT (the slowest of those paces it); a slower source is skipped.
        """
        sample = self.redis.lrange(self.key(batch_id, "queue"), 0, 99) or list(
            self.redis.hkeys(self.key(batch_id, "running"))
        )
        kinds = [raw.decode().partition(":")[0] for raw in sample]
        if not kinds:
            return None
        paces = {}
        for kind in set(kinds):
            rates = [
                s.settings.rate_per_minute / 60.0
                for s in sources_for(kind, services().sources)
                if s.settings.rate_per_minute > 0
            ]
            waited = [rate for rate in rates if 1.0 / rate <= self.settings.batch_source_wait]
            paces[kind] = min(waited or rates or [0.0])
        # Seconds per item, averaged over the mix of types left.
        per_item = sum(1.0 / paces[kind] if paces[kind] else 0.0 for kind in kinds) / len(kinds)
        return 1.0 / per_item if per_item else None

    def _held_calls(self, batch_id: str) -> tuple[int, float, float]:
        """The batch's items in flight and their calls waiting for a rate limit, read off their
        lookups (a waiting call is `rate_limited` with `scheduled_at`, the due time of its entry in
        the deferred set): (items in flight, the waits their calls were given, each item's longest
        one summed (its due time less when it was set), the longest wait still ahead of one).
        """
        sources = services().sources
        entries = []
        for raw_key, raw_value in self.redis.hgetall(self.key(batch_id, "running")).items():
            lookup_id, _, work_id = _running_entry(raw_value.decode())
            if lookup_id:  # claimed but not started (a lost step): nothing waits yet
                kind = raw_key.decode().partition(":")[0]
                entries.append((work_id, [f"s:{s.name}" for s in sources_for(kind, sources)]))
        if not entries:
            return 0, 0.0, 0.0
        store = services().lookups
        with self.redis.pipeline(transaction=False) as pipe:
            for work_id, fields in entries:
                pipe.hmget(store.record_key(work_id), fields)
            replies = pipe.execute()
        now, given, ahead = time.time(), 0.0, 0.0
        for raw_states in replies:
            states = (orjson.loads(raw) for raw in raw_states if raw)
            waits = [
                (state["scheduled_at"], state.get("updated_at") or now)
                for state in states
                if state["state"] == "rate_limited" and state.get("scheduled_at")
            ]
            if waits:
                given += max(0.0, max(due - since for due, since in waits))
                ahead = max(ahead, max(due for due, _ in waits) - now)
        return len(entries), given, ahead

    def rows(self, batch_id: str) -> Iterator[dict]:
        """One row per input line, in order, read ROWS_CHUNK lines at a time (never all at once)."""
        status = (self.redis.hget(self.key(batch_id), "status") or b"").decode()
        lines_key, items_key, running_key = self._keys(batch_id, "lines", "items", "running")
        start = 0
        while True:
            chunk = [orjson.loads(raw) for raw in self.redis.lrange(lines_key, start, start + ROWS_CHUNK - 1)]
            if not chunk:
                return
            keys = sorted({entry[2] for entry in chunk if entry[2]})
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(items_key, keys) if keys else pipe.ping()
                pipe.hmget(running_key, keys) if keys else pipe.ping()
                settled, running = pipe.execute()
            summaries = dict(zip(keys, settled, strict=True)) if keys else {}
            in_flight = dict(zip(keys, running, strict=True)) if keys else {}
            for line, value, key, reason in chunk:
                yield batch_rows.row(line, value, key, reason, summaries.get(key), in_flight.get(key), status)
            start += ROWS_CHUNK

    # -- cancel and the step --------------------------------------------------------------------
    def cancel_token_matches(self, batch_id: str, cancel_token: str | None) -> bool | None:
        """Whether `cancel_token` is the one the batch's creation returned; None when the batch is
        unknown.  The hashes are compared in constant time (hmac.compare_digest), so how long a
        wrong token takes says nothing of the right one; no token, or a batch without a token's
        hash, never matches."""
        if len(batch_id) > 64:
            return None
        status, stored = self.redis.hmget(self.key(batch_id), ["status", "cancel_token_sha256"])
        if status is None:
            return None
        if not cancel_token or stored is None:
            return False
        return hmac.compare_digest(_token_hash(cancel_token), stored.decode())

    def cancel(self, batch_id: str) -> str | None:
        """Cancel the items not started yet (those in flight finish); the batch's status after, or None."""
        status = self._cancel(keys=self._keys(batch_id, "", "queue"), args=[time.time()]).decode()
        if not status:
            return None
        if status == "cancelled":
            self._publish_progress(batch_id)
            self._finish_if_done(batch_id)
        return status

    def kick(self, batch_id: str) -> None:
        """Send the batch's step now (it runs at the lowest priority, like the items)."""
        pipeline.send_task(
            STEP_TASK, [batch_id], {"priority": pipeline.celery_priority(pipeline.BATCH_PRIORITY)}
        )

    def _kick_if_stalled(self, batch_id: str, values: dict) -> None:
        """A running batch whose step chain broke (a worker lost with it) gets a new step."""
        last = float(values.get("stepped_at") or values["created_at"])
        if time.time() - last > max(STALL_SECONDS, self.settings.batch_poll_interval * 50):
            if self.redis.set(self.key(batch_id, "kicked"), 1, nx=True, ex=int(STALL_SECONDS)):
                log.warning("batch %s: no step for %.0f s; sending one", batch_id, time.time() - last)
                self.kick(batch_id)

    def step(self, batch_id: str) -> str:
        """Collect answers of the items in flight, start new ones, publish progress; reschedule.

        Runs in a worker (job_queue.batch_step).  One step per batch at a time (a lock); the
        step that holds it schedules the next one.  Returns what it did (for the task's log).
        """
        lock = self.key(batch_id, "step")
        token = secrets.token_hex(8)
        if not self.redis.set(lock, token, nx=True, ex=STEP_LOCK_SECONDS):
            self._schedule_step(batch_id)  # the step holding the lock may be the one that ends the chain
            return "busy"
        try:
            created, finished, *before = self.redis.hmget(
                self.key(batch_id), ["created_at", "finished_at", *COUNT_FIELDS]
            )
            if created is None:
                return "gone"
            if finished is not None:
                return "finished"  # a step left over from a kick: the chain ends here
            self._collect(batch_id)
            self._start_items(batch_id)
            after = self._note_pace(batch_id)
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
        services().deferred.add(
            time.time() + self.settings.batch_poll_interval,
            STEP_TASK,
            [batch_id],
            {"priority": pipeline.celery_priority(pipeline.BATCH_PRIORITY)},
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
        running = {
            k.decode(): v.decode() for k, v in self.redis.hgetall(self.key(batch_id, "running")).items()
        }
        if not running:
            return
        store = services().lookups
        now = time.time()
        limit = self.item_limit
        entries = {key: _running_entry(value) for key, value in running.items()}
        with self.redis.pipeline(transaction=False) as pipe:
            for lookup_id, _, work_id in entries.values():
                if lookup_id:
                    pipe.hget(store.record_key(work_id), "status")
                    pipe.exists(store.answered_key(work_id))
            # Seen in flight by this step: what _CLAIM's cutoff for stale members counts from.
            pipe.zadd(self.inflight_key, {f"{batch_id}|{key}": now for key in entries}, xx=True)
            replies = iter(pipe.execute()[:-1])
        overdue: dict[str, tuple[Lookup, float]] = {}
        for key, (lookup_id, started, _) in entries.items():
            if not lookup_id:
                # Claimed by a step that stopped before starting it (a lost worker): start it now.
                self._start(batch_id, key, float(started or now))
                continue
            status, answered = next(replies), next(replies)
            if status == b"complete" or answered:
                lookup = store.get(lookup_id)
                if lookup is not None:
                    self._settle_item(batch_id, key, batch_rows.summary_of(lookup, True))
                    continue
            if status is None and not answered:
                error = "its lookup expired before it completed"
                self._settle_item(batch_id, key, batch_rows.failed(error, lookup_id))
            elif now - float(started or now) > limit:  # its last sign of work is no earlier than that
                lookup = store.get(lookup_id)
                since = _last_sign_of_work(lookup, float(started or now)) if lookup else now
                if lookup is not None and now - since > limit:
                    overdue[key] = (lookup, since)
        # Reading the broker for their tasks costs up to redis_broker.SCAN_MAX messages: once in a while.
        if overdue and self.redis.set(
            self.key(batch_id, "lost-check"), 1, nx=True, px=int(LOST_CHECK_SECONDS * 1000)
        ):
            self._settle_lost(batch_id, overdue, now)

    def _settle_lost(self, batch_id: str, overdue: dict[str, tuple[Lookup, float]], now: float) -> None:
        """Of the items whose lookups did nothing for `item_limit`, settle those no task of which is
        left to run (`_owed` names the rest: they wait, as for a task the broker still owes).

        A lookup none of whose sources ever started is not lost but never sent: its record was
        written and its task was not (Redis lost inside a step, between the two; the step after
        starts the item again and it joins that record, its single flight).  Its deadline sends it
        again only with every queue empty, which a batch's backlog never is; here no message for
        it is left, so it is sent again and the item waits for it."""
        owed = self._owed({lookup.work_id for lookup, _ in overdue.values()})
        store = services().lookups
        for key, (lookup, since) in overdue.items():
            if lookup.work_id in owed:
                continue
            if lookup.done == len(lookup.sources):
                # Every source settled but the finalize was lost with its worker: finish it here.
                pipeline.finalize(lookup.work_id)
                finished = store.get(lookup.id)
                if finished is not None and finished.status == LookupStatus.COMPLETE:
                    self._settle_item(batch_id, key, batch_rows.summary_of(finished, True))
                    continue
            work = store.get(lookup.work_id) if lookup.shared_id else lookup  # the record: its call ids
            if work is not None and pipeline.never_started(work):
                log.warning(
                    "batch %s: the lookup %s of an item never started and no task of it is left; "
                    "sending its task again",
                    batch_id,
                    work.id,
                    extra={"batch_id": batch_id, "lookup_id": work.id},
                )
                pipeline.send_again(work)
                continue
            log.warning(
                "batch %s: the lookup %s of an item did nothing for %.0f s and has no task left; "
                "the item settles without it",
                batch_id,
                lookup.id,
                now - since,
                extra={"batch_id": batch_id, "lookup_id": lookup.id},
            )
            self._settle_item(batch_id, key, batch_rows.lost(lookup, now - since))

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
        deferred = services().deferred.key  # its members are plain JSON: [call id, task, args, options]
        if self.redis.zcard(deferred) > redis_broker.SCAN_MAX:
            return set(work_ids)
        for raw in self.redis.zrange(deferred, 0, -1):
            text = raw.decode(errors="replace")
            named.update(work_id for work_id in work_ids if work_id in text)
        return named

    def _start_items(self, batch_id: str) -> None:
        now = time.time()
        claimed = self._claim(
            keys=self._keys(batch_id, "", "queue", "running") + [self.inflight_key],
            args=[
                max(1, self.settings.batch_concurrency),
                now,
                batch_id,
                now - self.item_limit * 2,
                self.ttl,
            ],
        )
        for raw in claimed:
            self._start(batch_id, raw.decode(), now)

    def _start(self, batch_id: str, key: str, started: float) -> None:
        lookup, _ = pipeline.start_lookup(_identifier(key), pipeline.BATCH_PRIORITY)
        if lookup.status == LookupStatus.COMPLETE:  # cached since the batch was created
            self._settle_item(batch_id, key, batch_rows.summary_of(lookup, True))
        else:
            # The item's own id first (results show it); the shared record's last, to read its status.
            shared = f"|{lookup.shared_id}" if lookup.shared_id else ""
            self.redis.hset(self.key(batch_id, "running"), key, f"{lookup.id}|{started}{shared}")

    def _settle_item(self, batch_id: str, key: str, summary: dict) -> bool:
        return bool(
            self._settle(
                keys=self._keys(batch_id, "", "running", "items") + [self.inflight_key],
                args=[key, orjson.dumps(summary), summary["state"], f"{batch_id}|{key}", self.ttl],
            )
        )

    def _note_pace(self, batch_id: str) -> list[bytes | None]:
        """Keep a sample (time, items done) some 5-30 s old for the measured throughput, in one read
        and one write; returns the counts it read (COUNT_FIELDS' values)."""
        key = self.key(batch_id)
        pace_t, pace_t2, pace_done2, cached, *counts = self.redis.hmget(
            key, ["pace_t", "pace_t2", "pace_done2", "cached", *COUNT_FIELDS]
        )
        now = time.time()
        settled = dict(zip(ITEM_STATES, counts, strict=True))
        done = sum(int(settled[state] or 0) for state in SETTLED_STATES) - int(cached or 0)
        fields: dict[str, Any] = {"stepped_at": now}
        if not pace_t:
            fields.update(pace_t=now, pace_done=done, pace_t2=now, pace_done2=done)
        elif now - float(pace_t2) >= 5:
            # The newer sample becomes the one measured from; the current state the newer one.
            fields.update(pace_t=pace_t2, pace_done=pace_done2, pace_t2=now, pace_done2=done)
        self.redis.hset(key, mapping=fields)
        return counts

    def _finish_if_done(self, batch_id: str) -> bool:
        if not self._finish_once(batch_id):
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
            services().events.publish(self.channel(batch_id), "complete", status)
        return True

    def _publish_progress(self, batch_id: str) -> None:
        status = self.status(batch_id)
        if status is not None:
            services().events.publish(self.channel(batch_id), "progress", status)

    # -- housekeeping ------------------------------------------------------------------------------
    def delete_older_than(self, cutoff: float) -> int:
        """Beat cleanup: batches created before `cutoff`, with all their keys."""
        removed = 0
        while True:
            ids = [
                i.decode() for i in self.redis.zrangebyscore(self.index_key, "-inf", cutoff, start=0, num=200)
            ]
            if not ids:
                return removed
            for batch_id in ids:
                self.storage.release(batch_id)
                parts = ("", "lines", "queue", "running", "items", "step", "kicked", "lost-check")
                self.redis.unlink(
                    *self._keys(batch_id, *parts), services().events.stream_key(self.channel(batch_id))
                )
                removed += 1
            self.redis.zrem(self.index_key, *ids)
            self.redis.srem(self.unfinished_key, *ids)

    def _finish_once(self, batch_id: str) -> bool:
        return bool(
            self._finish(keys=[self.key(batch_id), self.unfinished_key], args=[time.time(), batch_id])
        )

    def _unfinished(self) -> list[tuple[str, int]]:
        """(id, items pending) of the batches not finished; an id whose batch expired is dropped."""
        ids = [raw.decode() for raw in self.redis.smembers(self.unfinished_key)]
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hget(self.key(batch_id), "n:pending")
            pending = pipe.execute()
        gone = [batch_id for batch_id, count in zip(ids, pending, strict=True) if count is None]
        if gone:
            self.redis.srem(self.unfinished_key, *gone)
        return [
            (batch_id, int(count)) for batch_id, count in zip(ids, pending, strict=True) if count is not None
        ]

    def running_ids(self) -> list[str]:
        """Batches not finished yet: for the health check's re-kick of a stalled one."""
        return [batch_id for batch_id, _ in self._unfinished()]

    def cluster_stats(self) -> dict[str, int]:
        """For /api/status and /metrics: batches not finished, their items waiting, items in flight."""
        unfinished = self._unfinished()
        return {
            "running": len(unfinished),
            "items_pending": sum(pending for _, pending in unfinished),
            "items_in_flight": int(self.redis.zcard(self.inflight_key)),
        }
