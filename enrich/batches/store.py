"""Bulk batches in Redis: their records and keys, reading status and rows, the cancel flag, deletion, stats.

The store only stores and reads: reading a batch (status, ETA, rows, stats) writes nothing.  What
moves a batch along (steps, starting and settling items, progress events) is the runner
(batches/runner.py); the links a status shows are the routes' (web/batch_api.py).

Redis, under `{prefix}:batch:<id>` (all expiring after BATCH_RETENTION):
- the hash itself: status (running|complete|cancelled), times, totals, counts `n:<state>`, the
  pace samples and `stepped_at` the runner notes, and `cancel_token_sha256`, the hash of the
  cancel token its creation returned (never the token);
- `:lines` a list, one JSON `[line, input, item key or "", reason]` per input line, in order;
- `:queue` item keys not started yet; `:running` item key -> "lookup id|started at[|shared id]"
  (the lookup id is the item's own; the shared id is the lookup it joined, when it joined one);
- `:items` item key -> its summary JSON once settled (state, main fields, sources, error);
- the runner's short-lived `:step` lock, `:kicked` and `:lost-check` marks (named here, deleted
  with the batch).
`{prefix}:batches` indexes batches by creation time; `{prefix}:batches:unfinished` holds the ids
of those not finished; `{prefix}:batches:inflight` holds every batch's items in flight (the
cluster-wide BATCH_CONCURRENCY), each scored by the last step that saw it in flight (a member no
step has seen for a while is dropped by the next claim: its batch is gone).  Every change of
counts is one Lua script (batches/scripts.py), so two steps that ever overlap (a redelivered task)
cannot count an item twice.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import orjson
import redis

from enrich import redis_store
from enrich.batches import eta, record, scripts
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.batches.record import COUNT_FIELDS, ITEM_STATES, SETTLED_STATES
from enrich.batches.storage import BatchStorage
from enrich.lookups import LookupStore
from enrich.settings import Settings
from enrich.sources import Source

log = logging.getLogger("batches")

ROWS_CHUNK = 500  # input lines read per round trip while results stream out
ETA_QUEUE_SAMPLE = 100  # queued items whose types the ETA's rate-limit pace averages over
# Every key of one batch, as `key(batch_id, part)` names them ("" is the hash itself).
BATCH_PARTS = ("", "lines", "queue", "running", "items", "step", "kicked", "lost-check")


class InFlight(NamedTuple):
    """An item in flight as `:running` keeps it: its own lookup id ("" while claimed and not
    started), when it was claimed or started, and the id of the record that does its work."""

    lookup_id: str
    started: str
    work_id: str

    @classmethod
    def parse(cls, value: str) -> InFlight:
        lookup_id, _, rest = value.partition("|")
        started, _, shared = rest.partition("|")
        return cls(lookup_id, started, shared or lookup_id)


class BatchStore:
    """Batches in Redis: creation, status, rows, the cancel flag, and the item records a runner moves."""

    def __init__(
        self, client: redis.Redis, settings: Settings, lookups: LookupStore, sources: Mapping[str, Source]
    ) -> None:
        self.redis = client
        self.settings = settings
        self.lookups = lookups  # the items' lookups, for the ETA's held calls
        self.sources = sources  # their rate limits, for the ETA's pace
        self._claim = client.register_script(scripts.CLAIM)
        self._settle = client.register_script(scripts.SETTLE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._finish = client.register_script(scripts.FINISH)
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
    def create(
        self,
        parsed: batch_input.ParsedBatch,
        name: str = "",
        client: str = "cli",
        cached: Mapping[str, dict] | None = None,
    ) -> dict:
        """Store a parsed batch, its items in `cached` (item key -> summary, answered from the cache)
        and its CPFs settled, the rest queued; returns its status plus `cancel_token`, the secret
        `DELETE /api/batches/<id>` needs (in `X-Cancel-Token`).  Nothing is sent: the runner's
        `create` is what also sends the first step.

        Its bytes are reserved first against the caps for all batches and for `client` (its
        address; "cli" for `flask batch run`): storage.StorageFull when there is no room.

        The token is returned here and only here: the batch keeps its hash, and no status, event or
        result shows either.  The id is meant to be shared (progress, results); the token is not.
        """
        batch_id = secrets.token_urlsafe(16)
        cancel_token = secrets.token_urlsafe(16)
        while batch_id.startswith("-"):  # `flask batch status <id>` would read it as an option
            batch_id = secrets.token_urlsafe(16)
        now = time.time()
        cached = dict(cached or {})
        batch = record.new_batch(parsed, name, cached, cancel_token, now)
        self.storage.reserve(batch_id, client, batch.size, self._oldest_created)
        self._write(batch_id, batch, now)
        if not batch.queued:
            self.finish_if_done(batch_id)
        log.info(
            "batch %s created: %d lines, %d items (%d cached, %d invalid lines)",
            batch_id,
            len(parsed.lines),
            len(parsed.unique),
            len(cached),
            len(parsed.invalid),
            extra={"batch_id": batch_id, "items": len(parsed.unique), "cached": len(cached)},
        )
        return {**self.status(batch_id), "cancel_token": cancel_token}

    def _write(self, batch_id: str, batch: record.NewBatch, now: float) -> None:
        ttl = self.ttl
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key(batch_id), mapping=batch.fields)
            lines_key, queue_key, items_key = self._keys(batch_id, "lines", "queue", "items")
            for start in range(0, len(batch.entries), 1000):
                pipe.rpush(lines_key, *batch.entries[start : start + 1000])
            for start in range(0, len(batch.queued), 1000):
                pipe.rpush(queue_key, *batch.queued[start : start + 1000])
            if batch.summaries:
                pipe.hset(items_key, mapping=batch.summaries)
            for key in (self.key(batch_id), lines_key, queue_key, items_key):
                pipe.expire(key, ttl)
            pipe.zadd(self.index_key, {batch_id: now})
            pipe.sadd(self.unfinished_key, batch_id)
            pipe.execute()

    def _oldest_created(self) -> float | None:
        """When the oldest batch still kept was created (None: there is none)."""
        oldest = self.redis.zrange(self.index_key, 0, 0, withscores=True)
        return oldest[0][1] if oldest else None

    # -- reading (never writes) ----------------------------------------------------------------
    def exists(self, batch_id: str) -> bool:
        return len(batch_id) <= 64 and bool(self.redis.exists(self.key(batch_id)))

    def status(self, batch_id: str) -> dict | None:
        """The body of `GET /api/batches/<id>` but its links; None when unknown or expired."""
        return self.status_and_last_step(batch_id)[0]

    def status_and_last_step(self, batch_id: str) -> tuple[dict | None, float | None]:
        """`status`, and `last_step_at` from the same read (a status shown to someone is also
        checked for a stalled batch: one round trip for both)."""
        if len(batch_id) > 64:
            return None, None
        raw = self.redis.hgetall(self.key(batch_id))
        if not raw:
            return None, None
        values = {k.decode(): v.decode() for k, v in raw.items()}
        last_step = (
            None if values.get("finished_at") else float(values.get("stepped_at") or values["created_at"])
        )
        return self._status_body(batch_id, values), last_step

    def _status_body(self, batch_id: str, values: dict[str, str]) -> dict:
        counts = {state: max(0, int(values.get(f"n:{state}", 0))) for state in ITEM_STATES}
        settled = sum(counts[state] for state in SETTLED_STATES)
        body: dict[str, Any] = {
            "id": batch_id,
            "status": values["status"],
            "name": values.get("name") or None,
            "total": int(values["total"]),
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
        return body

    def _eta(self, batch_id: str, values: dict, counts: dict) -> dict:
        """The status's `eta_seconds`, `throughput_per_second` and `rate_limit_per_second` (eta.py)."""
        left = counts["pending"] + counts["running"]
        if values.get("finished_at") or left == 0:
            return dict(eta.NOTHING_LEFT)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.key(batch_id, "queue"), 0, ETA_QUEUE_SAMPLE - 1)
            pipe.hgetall(self.key(batch_id, "running"))
            queued, running = pipe.execute()
        in_flight = {key.decode(): InFlight.parse(value.decode()) for key, value in running.items()}
        done = sum(counts[state] for state in SETTLED_STATES) - int(values.get("cached", 0))
        return eta.estimate(
            left=left,
            done=done,
            pace_sample=(float(values.get("pace_t", 0) or 0), int(values.get("pace_done", 0) or 0)),
            # What the rate limits allow is paced by the types to come; the ones in flight once none is.
            kinds=[raw.decode().partition(":")[0] for raw in queued]
            or [key.partition(":")[0] for key in in_flight],
            # A claimed item not started yet (a lost step) has nothing waiting.
            started=[
                (item.work_id, key.partition(":")[0]) for key, item in in_flight.items() if item.lookup_id
            ],
            sources=self.sources,
            lookups=self.lookups,
            source_wait=self.settings.batch_source_wait,
        )

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
        return hmac.compare_digest(record.token_hash(cancel_token), stored.decode())

    def last_step_at(self, batch_id: str) -> float | None:
        """When a batch not finished had its last step (its creation, before the first); None when
        it is finished, unknown or expired."""
        if len(batch_id) > 64:
            return None
        created, stepped, finished = self.redis.hmget(
            self.key(batch_id), ["created_at", "stepped_at", "finished_at"]
        )
        if created is None or finished is not None:
            return None
        return float(stepped or created)

    def counts_if_open(self, batch_id: str) -> tuple[str, list[bytes | None]]:
        """("gone", []) for a batch unknown or expired, ("finished", []) for one finished, else
        ("open", its counts as stored: COUNT_FIELDS' raw values, to tell whether a step changed them)."""
        created, finished, *counts = self.redis.hmget(
            self.key(batch_id), ["created_at", "finished_at", *COUNT_FIELDS]
        )
        if created is None:
            return "gone", []
        if finished is not None:
            return "finished", []
        return "open", counts

    def in_flight(self, batch_id: str) -> dict[str, InFlight]:
        """The batch's items in flight (claimed or started), by item key."""
        running = self.redis.hgetall(self.key(batch_id, "running"))
        return {key.decode(): InFlight.parse(value.decode()) for key, value in running.items()}

    def unfinished(self) -> list[tuple[str, int]]:
        """(id, items pending) of the batches not finished; an id whose batch expired is left out."""
        ids = [raw.decode() for raw in self.redis.smembers(self.unfinished_key)]
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hget(self.key(batch_id), "n:pending")
            pending = pipe.execute()
        return [
            (batch_id, int(count)) for batch_id, count in zip(ids, pending, strict=True) if count is not None
        ]

    def running_ids(self) -> list[str]:
        """Batches not finished yet: for the health check's re-kick of a stalled one."""
        return [batch_id for batch_id, _ in self.unfinished()]

    def cluster_stats(self) -> dict[str, int]:
        """For /api/status and /metrics: batches not finished, their items waiting, items in flight."""
        unfinished = self.unfinished()
        return {
            "running": len(unfinished),
            "items_pending": sum(pending for _, pending in unfinished),
            "items_in_flight": int(self.redis.zcard(self.inflight_key)),
        }

    # -- the item records a runner moves ------------------------------------------------------
    def claim(self, batch_id: str, cap: int, now: float, stale_before: float) -> list[str]:
        """Move up to `cap` less the items in flight cluster-wide from the batch's queue into its
        `:running` (claimed, not started), once its status is `running`; members of the in-flight
        set no step has seen since `stale_before` are dropped first.  Returns the claimed item keys."""
        claimed = self._claim(
            keys=self._keys(batch_id, "", "queue", "running") + [self.inflight_key],
            args=[cap, now, batch_id, stale_before, self.ttl],
        )
        return [raw.decode() for raw in claimed]

    def mark_started(
        self, batch_id: str, key: str, lookup_id: str, started: float, shared_id: str | None
    ) -> None:
        """A claimed item's lookup started: its own id first (results show it), the shared record's
        last (whose status a step reads)."""
        shared = f"|{shared_id}" if shared_id else ""
        self.redis.hset(self.key(batch_id, "running"), key, f"{lookup_id}|{started}{shared}")

    def mark_seen(self, batch_id: str, keys: list[str], now: float) -> None:
        """The items in flight a step saw now: what `claim`'s cutoff for stale members counts from."""
        if keys:
            self.redis.zadd(self.inflight_key, {f"{batch_id}|{key}": now for key in keys}, xx=True)

    def settle(self, batch_id: str, key: str, summary: dict) -> bool:
        """An item in flight settles into `summary`, once: False when another step already settled it."""
        return bool(
            self._settle(
                keys=self._keys(batch_id, "", "running", "items") + [self.inflight_key],
                args=[key, orjson.dumps(summary), summary["state"], f"{batch_id}|{key}", self.ttl],
            )
        )

    def note_step(self, batch_id: str) -> list[bytes | None]:
        """A step ran now (`stepped_at`), and a sample (time, items done) some 5-30 s old is kept for
        the measured throughput, in one read and one write; returns the counts it read (COUNT_FIELDS')."""
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

    def cancel(self, batch_id: str) -> str | None:
        """Mark the batch cancelled, its items not started cancelled (those in flight finish); the
        batch's status after ("complete" when it already was), or None when unknown."""
        status = self._cancel(keys=self._keys(batch_id, "", "queue"), args=[time.time()]).decode()
        return status or None

    def finish_if_done(self, batch_id: str) -> bool:
        """Mark the batch finished once nothing is pending or in flight; True when this call did."""
        return bool(
            self._finish(keys=[self.key(batch_id), self.unfinished_key], args=[time.time(), batch_id])
        )

    # -- housekeeping ------------------------------------------------------------------------------
    def delete_older_than(self, cutoff: float, event_key: Callable[[str], str]) -> int:
        """Beat cleanup: batches created before `cutoff`, with all their keys and their event log
        (`event_key(channel)`); ids of batches that expired are dropped from the unfinished set."""
        removed = 0
        while True:
            ids = [
                i.decode() for i in self.redis.zrangebyscore(self.index_key, "-inf", cutoff, start=0, num=200)
            ]
            if not ids:
                break
            for batch_id in ids:
                self.storage.release(batch_id)
                self.redis.unlink(*self._keys(batch_id, *BATCH_PARTS), event_key(self.channel(batch_id)))
                removed += 1
            self.redis.zrem(self.index_key, *ids)
            self.redis.srem(self.unfinished_key, *ids)
        listed = [raw.decode() for raw in self.redis.smembers(self.unfinished_key)]
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in listed:
                pipe.exists(self.key(batch_id))
            gone = [batch_id for batch_id, kept in zip(listed, pipe.execute(), strict=True) if not kept]
        if gone:
            self.redis.srem(self.unfinished_key, *gone)
        return removed
