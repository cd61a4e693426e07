"""Lookup records in Redis: states, per-source results, single flight, per-request aliases and task registry.

Single flight shares one lookup's work among everyone who asks for the same identifier at once,
but not its identity: the request that starts a lookup gets the record's id, and every request
that joins it gets an *alias* of its own (`{prefix}:alias:<id>`: the shared id, its own priority,
times and call ids), so no client ever sees another's lookup id, priority, times or call ids.

A record does not copy its sources' data: each source's state names the version of the cache
entry that holds it (cache_manager.EntryVersion, checked and named by the `_NAMED` script), which
the cache keeps for as long as a record may name it; it carries the data only where no cache entry
would live as long as the record.  The merged result is kept as a patch on one named source's data.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from cache_manager import EntryVersion
from enrich import answer_ids, redis_store, status_history
from enrich.json_encoding import encode_json
from enrich.settings import Settings

log = logging.getLogger("lookups")


class LookupStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PARTIAL = "partial"
    COMPLETE = "complete"


class SourceState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    OK = "ok"
    NOT_FOUND = "not_found"
    ERROR = "error"
    STALE = "stale"
    RATE_LIMITED = "rate_limited"
    CIRCUIT_OPEN = "circuit_open"


FINAL_STATES = frozenset(
    {SourceState.OK, SourceState.NOT_FOUND, SourceState.ERROR, SourceState.STALE, SourceState.CIRCUIT_OPEN}
)


@dataclass(frozen=True)
class SourceResult:
    """One source's part of a lookup.  `scheduled_at` is when a deferred call runs (epoch seconds)."""

    source: str
    state: SourceState
    data: dict | None = None
    cached: bool = False
    stale: bool = False
    elapsed_ms: float | None = None
    error: str | None = None
    scheduled_at: float | None = None
    attempts: int = 0
    updated_at: float | None = None  # when a worker recorded this state (None: from the cache)
    # The cache entry version that holds `data`: the record names it instead of copying the data
    # (LookupStore).  Never part of the API body.
    origin: EntryVersion | None = field(default=None, compare=False, repr=False)

    @property
    def settled(self) -> bool:
        """Final answer reached; a rate-limited call with no scheduled run is settled too."""
        return self.state in FINAL_STATES or (
            self.state == SourceState.RATE_LIMITED and self.scheduled_at is None
        )

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that deep-copies `data` on every call, on the hottest path there is.
        return {
            "source": self.source,
            "state": str(self.state),
            "data": self.data,
            "cached": self.cached,
            "stale": self.stale,
            "elapsed_ms": self.elapsed_ms,
            "error": self.error,
            "scheduled_at": self.scheduled_at,
            "attempts": self.attempts,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, values: dict) -> SourceResult:
        return cls(**{**values, "state": SourceState(values["state"])})


@dataclass
class Lookup:
    """A lookup as read back from Redis."""

    id: str
    type: str
    identifier: str
    priority: int
    status: LookupStatus
    created_at: float
    deadline_at: float
    sources: dict[str, SourceResult]
    tasks: dict[str, str] = field(default_factory=dict)
    result: dict | None = None
    completed_at: float | None = None
    # `to_dict()` already encoded (json_encoding.encode_json), when the store made it: sent as is.
    encoded: bytes | None = field(default=None, repr=False, compare=False)
    # For a request that joined another's lookup: the id of the shared record whose work it shows.
    # Internal (events, batches); never part of the API body.
    shared_id: str | None = field(default=None, repr=False, compare=False)

    @property
    def work_id(self) -> str:
        """The id of the record whose sources and events this lookup shows (its own, or the shared one)."""
        return self.shared_id or self.id

    @property
    def done(self) -> int:
        return sum(result.settled for result in self.sources.values())

    @property
    def cached(self) -> bool:
        return bool(self.sources) and all(result.cached for result in self.sources.values())

    def head(self) -> dict[str, Any]:
        """The part of `to_dict()` that is this lookup's own, not its sources' (see ANSWER_BODY_FIELDS)."""
        return {
            "id": self.id or None,  # None: a CPF, answered from the number alone (cpf_answers.py)
            "status": str(self.status),
            "type": self.type,
            "identifier": self.identifier,
            "priority": self.priority,
            "created_at": self.created_at,
            "deadline_at": self.deadline_at,
            "completed_at": self.completed_at,
            "links": (
                {"self": f"/api/lookups/{self.id}", "events": f"/api/lookups/{self.id}/events"}
                if self.id
                else {}
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        """The API representation (the README's API section; docs/architecture.md, "The HTTP contract")."""
        merged = self.result or {}
        return {
            **self.head(),
            "cached": self.cached,
            "progress": {"done": self.done, "total": len(self.sources)},
            "sources": {name: result.to_dict() for name, result in self.sources.items()},
            "tasks": self.tasks,
            "result": merged.get("data"),
            "checks": merged.get("checks", []),
        }


# Whether a record may name a cache entry's version for a source's data (KEYS: the record, the
# entry, the entry's kept copy; ARGV: the entry as stored): when the entry still holds that content,
# or its kept copy exists, and lives at least as long as the record (cache_manager's doc).
_NAMED = """
local function can_name(record, entry, kept, raw)
  local life = redis.call('PTTL', record)
  return (redis.call('GET', entry) == raw and redis.call('PTTL', entry) >= life)
    or redis.call('PTTL', kept) >= life
end
local function naming(head, ref) return head .. ',"ref":"' .. ref .. '"}' end
"""

# KEYS[1] lookup hash, and for a state naming a cache entry KEYS[2] the entry and KEYS[3] its kept
# copy.  ARGV: field, state json, settled (1/0), replace_settled (1/0), and for one naming an entry
# (its state json unused) the state's JSON without its data and closing brace, the entry as stored
# and its ref: the state names the entry when it can (`can_name`), else carries it.
# Returns {applied (1/0), newly settled (1/0), done, total}.  A settled source is never overwritten
# (tasks may run twice after a redelivery) unless replace_settled (a dead letter requeued).
_SET_SOURCE = (
    _NAMED
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, -1, -1} end
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local listed = ',' .. (redis.call('HGET', KEYS[1], 'sources') or '') .. ','
if not string.find(listed, ',' .. ARGV[1] .. ',', 1, true) then
  return {0, 0, tonumber(redis.call('HGET', KEYS[1], 'done')), total}  -- not one of its sources
end
local settled_field = 'settled:' .. ARGV[1]
local was_settled = redis.call('HGET', KEYS[1], settled_field) == '1'
if was_settled and ARGV[4] ~= '1' then
  return {0, 0, tonumber(redis.call('HGET', KEYS[1], 'done')), total}
end
local state = ARGV[2]
if #KEYS == 3 then
  if can_name(KEYS[1], KEYS[2], KEYS[3], ARGV[6]) then
    state = naming(ARGV[5], ARGV[7])
  else
    state = ARGV[5] .. ',"entry":' .. ARGV[6] .. '}'
  end
end
redis.call('HSET', KEYS[1], 's:' .. ARGV[1], state)
local newly = 0
if ARGV[3] == '1' and not was_settled then
  redis.call('HSET', KEYS[1], settled_field, '1')
  redis.call('HINCRBY', KEYS[1], 'done', 1)
  newly = 1
end
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
end
return {1, newly, tonumber(redis.call('HGET', KEYS[1], 'done')), total}
"""
)

# KEYS[1] a new lookup hash, then each source state's cache entry and kept copy (two keys each).
# ARGV: each one's field, state head, entry as stored and ref (as `_SET_SOURCE`'s).  The record
# was written with every state carrying its data: a state is replaced by the one naming its entry
# only once that is known to hold (`can_name`), so a failure partway leaves the data in the record.
_NAME_SOURCES = (
    _NAMED
    + """
for i = 1, (#KEYS - 1) / 2 do
  local at = (i - 1) * 4
  if can_name(KEYS[1], KEYS[2 * i], KEYS[2 * i + 1], ARGV[at + 3]) then
    redis.call('HSET', KEYS[1], ARGV[at + 1], naming(ARGV[at + 2], ARGV[at + 4]))
  end
end
"""
)

# A source's state as a record keeps it: what differs from SourceResult's defaults, without its
# source (the field's name says it) and without its data, which it names (`ref`: a cache entry's
# version, cache_manager.EntryVersion) or, where no cache entry holds the data or none lives as
# long as the record, carries (`data`, or `entry`: the cache entry as stored).  A record written
# before names nothing: every field and `data` (read alike).
_UNSTORED = {"source", "state", "data", "origin"}  # the field's name, always there, or not a field
_STATE_DEFAULTS = tuple(
    (f.name, f.default) for f in dataclasses.fields(SourceResult) if f.name not in _UNSTORED
)


def _state_head(result: SourceResult) -> bytes:
    """The state's JSON without its data and its closing brace."""
    values: dict[str, Any] = {"state": str(result.state)}
    for name, default in _STATE_DEFAULTS:
        value = getattr(result, name)
        if value is not default and value != default:
            values[name] = value
    return orjson.dumps(values)[:-1]


def _state_json(result: SourceResult) -> bytes:
    """The state carrying its data (when it names no cache entry)."""
    head = _state_head(result)
    if result.data is None:
        return head + b"}"
    return head + b',"data":' + orjson.dumps(result.data) + b"}"


def _names_entry(result: SourceResult) -> bool:
    """Whether the state may name a cache entry for its data: one this process read or wrote."""
    return result.data is not None and result.origin is not None and result.origin.raw is not None


def _naming_args(result: SourceResult, settings: Settings) -> tuple[list[str], list[bytes | str]]:
    """The entry's and its kept copy's keys, and the (state head, entry as stored, ref) arguments
    of the scripts that name it (`_SET_SOURCE`, `_NAME_SOURCES`)."""
    origin = result.origin
    assert origin is not None and origin.raw is not None
    # Hashed once: the kept copy's key and the ref both hold the digest.
    version = origin._replace(known_digest=origin.digest)
    return list(version.keys(settings)), [_state_head(result), origin.raw, version.ref]


def _source_result(name: str, values: dict, data: dict | None, origin: EntryVersion | None) -> SourceResult:
    """A source's state as a record keeps it (`_STATE_DEFAULTS`), with its data and origin."""
    stored = {field: values.get(field, default) for field, default in _STATE_DEFAULTS}
    return SourceResult(name, SourceState(values["state"]), data=data, origin=origin, **stored)


def _diff(base: dict, target: dict) -> dict | None:
    """What `_patch` turns `base` into `target` with: target's values that differ (a dict in both
    as {"~": its own diff}), or None when target lacks a key of base's (a merge never drops one)."""
    if not base.keys() <= target.keys():
        return None
    diff: dict[str, Any] = {}
    for key, value in target.items():
        if key in base and base[key] == value and type(base[key]) is type(value):
            continue
        inner = (
            _diff(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else None
        )
        diff[key] = {"~": inner} if inner is not None else value
    return diff


def _patch(base: dict, diff: dict) -> dict:
    merged = dict(base)
    for key, value in diff.items():
        if isinstance(value, dict) and value.keys() == {"~"} and isinstance(merged.get(key), dict):
            merged[key] = _patch(merged[key], value["~"])
        else:
            merged[key] = value
    return merged


RESULT_DEFLATE_MIN = 128  # bytes of a stored result below which deflating it is not tried


def _stored_result(result: dict, sources: Mapping[str, SourceResult] | None) -> bytes:
    """The merged result as a record keeps it.  The merge fills the preferred answer's gaps from
    the others, so its data is usually one source's data and a few values: stored as a patch on a
    source's data that the record names (`base`: the source and its ref), when that is smaller and
    gives back exactly the same JSON, else whole.  Then deflated (`z` and raw deflate) when that
    is smaller: the checks' wordy JSON (about 1 kB for a company) takes a third of it."""
    stored = _result_json(result, sources)
    if len(stored) < RESULT_DEFLATE_MIN:
        return stored
    deflated = b"z" + zlib.compress(stored, 6, -10)  # a 1 KiB window: a fast start, as small
    return deflated if len(deflated) < len(stored) else stored


def _result_from(stored: bytes) -> dict:
    return orjson.loads(zlib.decompress(stored[1:], -15) if stored[:1] == b"z" else stored)


def _result_json(result: dict, sources: Mapping[str, SourceResult] | None) -> bytes:
    whole = orjson.dumps(result)
    data = result.get("data")
    if not sources or not isinstance(data, dict) or not set(result) <= {"data", "checks"}:
        return whole
    best, exact = whole, None
    for name, source in sources.items():
        if source.origin is None or source.origin.raw is not None or not isinstance(source.data, dict):
            continue  # only a version the record names (read back from it) outlives the record
        diff = _diff(source.data, data)
        if diff is None:
            continue
        stored = orjson.dumps(
            {"checks": result.get("checks", []), "base": [name, source.origin.ref], "patch": diff}
        )
        if len(stored) < len(best):
            exact = exact or orjson.dumps(data)
            if orjson.dumps(_patch(source.data, diff)) == exact:
                best = stored
    return best


# The task registry's entries (`task:{id}`), three per lookup: a source call's is short text, "f
# <lookup id> <source>[ <task id>]" (under 45 bytes Redis keeps a string in one allocation), any
# other JSON (the form all took before; both are read).
# The source call task's name: task_messages (a layer above the stores) takes it from here.
FETCH_TASK = "job_queue.fetch_source"


def _registry_entry(
    name: str, lookup_id: str | None, source: str | None, task_id: str | None = None
) -> bytes:
    parts = [lookup_id, source, *([task_id] if task_id is not None else [])]
    if name == FETCH_TASK and all(isinstance(part, str) and part and " " not in part for part in parts):
        return " ".join(["f", *parts]).encode()
    entry = {"name": name, "lookup_id": lookup_id, "source": source}
    return orjson.dumps(entry if task_id is None else {**entry, "task_id": task_id})


def _registry_read(raw: bytes) -> dict:
    if raw.startswith(b"{"):
        return orjson.loads(raw)
    _, lookup_id, source, *task_id = raw.decode().split(" ")
    entry = {"name": FETCH_TASK, "lookup_id": lookup_id, "source": source}
    return {**entry, "task_id": task_id[0]} if task_id else entry


# KEYS[1] lookup hash, KEYS[2] the status history's current bucket.  ARGV: new status, result
# json, now, the bucket's TTL, the outcome's field, then the latency bins' upper bounds (ms).
# Complete happens once; partial only from queued/running.  Returns 1 when this call made the
# change (and, for a first answer, counted it with its latency in the bucket), else 0.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'complete' then return 0 end
if ARGV[1] == 'partial' and status == 'partial' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'result', ARGV[2])
if ARGV[1] == 'complete' then redis.call('HSET', KEYS[1], 'completed_at', ARGV[3]) end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '')
if created and (status == 'queued' or status == 'running') then
  local ms = (tonumber(ARGV[3]) - created) * 1000
  local bin = 'latency:inf'
  for i = 6, #ARGV do
    if ms <= tonumber(ARGV[i]) then bin = 'latency:' .. ARGV[i]; break end
  end
  redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
  redis.call('HINCRBY', KEYS[2], bin, 1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return 1
"""


# KEYS[1] single-flight key.  ARGV[1] lookup id.  Deletes the key only if it names that lookup.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# The longest lookup id a route reads (a record's is 22 characters, a cached answer's answer_ids.ID_LENGTH).
MAX_LOOKUP_ID_LENGTH = 96
assert answer_ids.ID_LENGTH <= MAX_LOOKUP_ID_LENGTH

# The fields of an answered lookup that come from the cache entries alone (see create_answered).
ANSWER_BODY_FIELDS = ("sources", "progress", "cached", "result", "checks", "tasks")
ANSWER_BODIES_MAX = 10_000


def _from_answer(encoded: bytes) -> Lookup:
    """A lookup stored by `create_answered`, read back from its API JSON."""
    values = orjson.loads(encoded)
    return Lookup(
        id=values["id"],
        type=values["type"],
        identifier=values["identifier"],
        priority=values["priority"],
        status=LookupStatus(values["status"]),
        created_at=values["created_at"],
        deadline_at=values["deadline_at"],
        sources={name: SourceResult.from_dict(result) for name, result in values["sources"].items()},
        tasks=values["tasks"],
        result={"data": values["result"], "checks": values["checks"]},
        completed_at=values["completed_at"],
        encoded=encoded,
    )


def _as_alias(
    shared: Lookup, alias_id: str, priority: int, created_at: float, deadline_at: float, tasks: dict
) -> Lookup:
    """`shared` as the request that joined it sees it: its own id, priority, times and call ids."""
    return dataclasses.replace(
        shared,
        id=alias_id,
        priority=priority,
        created_at=created_at,
        deadline_at=deadline_at,
        tasks=tasks,
        encoded=None,
        shared_id=shared.id,
    )


def alias_head(event_data: dict, lookup: Lookup) -> dict:
    """A shared lookup's `partial`/`complete` event as the joined request `lookup` sees it."""
    head = lookup.head()
    own = {name: head[name] for name in ("id", "priority", "created_at", "deadline_at", "links")}
    return {**event_data, **own, "tasks": lookup.tasks}


def new_lookup_id() -> str:
    """A random id with 128 bits of entropy, URL-safe.

    Never starting with `-`: a CSV cell that does is defused with a leading `'` (batch_rows), and a
    command line would read it as an option.
    """
    lookup_id = secrets.token_urlsafe(16)
    while lookup_id.startswith("-"):
        lookup_id = secrets.token_urlsafe(16)
    return lookup_id


class LookupStore:
    """Reads and writes lookup records, the single-flight index and the issued-task registry."""

    BODY_CHECK_INTERVAL = 1.0  # seconds between checks that a shared answer body is still there

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._set_source = client.register_script(_SET_SOURCE)
        self._name_sources = client.register_script(_NAME_SOURCES)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self.answer_ids = answer_ids.AnswerIds(client, settings)
        self.answered_counts = status_history.Tally(client, settings)
        # entry versions -> (body members' JSON, stored body, digest)
        self._bodies: dict[tuple, tuple[bytes, bytes, bytes]] = {}
        self._bodies_written: dict[bytes, float] = {}  # digest -> when this process last wrote it
        self._bodies_checked: dict[bytes, float] = {}  # digest -> when this process last saw it there

    def _key(self, *parts: object) -> str:
        return redis_store.key(self.settings, *parts)

    def record_key(self, lookup_id: str) -> str:
        return self._key("lookup", lookup_id)

    def inflight_key(self, identifier_type: str, identifier: str) -> str:
        return self._key("inflight", identifier_type, identifier)

    def task_key(self, task_id: str) -> str:
        return self._key("task", task_id)

    def claim_inflight(self, identifier_type: str, identifier: str, lookup_id: str) -> str | None:
        """Single flight: register `lookup_id` for this identifier, or return the one already running."""
        key = self.inflight_key(identifier_type, identifier)
        ttl = self._claim_ttl()
        for _ in range(3):
            if self.redis.set(key, lookup_id, nx=True, ex=ttl):
                return None
            existing = self.redis.get(key)
            if existing is None:
                continue  # released meanwhile: try again
            status = self.redis.hget(self.record_key(existing.decode()), "status")
            if status is not None and status != b"complete":
                return existing.decode()
            # Points at an expired record, or one that completed and is about to release it: take it
            # over, deleting it only if it still names that lookup (compare-and-delete), so a claim
            # another request has just taken over is never deleted and two lookups never run.
            self._release(keys=[key], args=[existing])
        # Still contended after three tries: join whoever holds it now rather than claim it blind.
        holder = self.redis.get(key)
        return holder.decode() if holder is not None else None

    def release_inflight(self, identifier_type: str, identifier: str, lookup_id: str) -> None:
        """Drop the single-flight entry if it still names this lookup (one atomic compare-and-delete)."""
        self._release(keys=[self.inflight_key(identifier_type, identifier)], args=[lookup_id])

    def create(
        self, lookup: Lookup, claim: bool = False, also: Callable[[redis.client.Pipeline], None] | None = None
    ) -> str | None:
        """Write a new record, its settled sources and its task registry entries in one round trip.

        A source answered from a cache entry names that entry's version instead of copying its data
        (`_NAMED`).  With `claim`, the same round trip then takes the single flight for its
        identifier (after the record, so a claim always has its record); returns the id of the
        lookup already running for it, if one is.  `also(pipe)` adds the caller's own commands to
        that round trip.
        """
        ttl = self.settings.lookup_record_ttl
        key = self.record_key(lookup.id)
        fields: dict[str, Any] = {
            "type": lookup.type,
            "identifier": lookup.identifier,
            "priority": lookup.priority,
            "status": str(lookup.status),
            "created_at": lookup.created_at,
            "deadline_at": lookup.deadline_at,
            "tasks": orjson.dumps(lookup.tasks),
            "sources": ",".join(lookup.sources),
            "done": lookup.done,
            "total": len(lookup.sources),
        }
        if lookup.result is not None:
            fields["result"] = orjson.dumps(lookup.result)
        if lookup.completed_at is not None:
            fields["completed_at"] = lookup.completed_at
        naming_keys, naming_args = [key], []
        for name, result in lookup.sources.items():
            # Every state carries its data until the script (after the TTL) names its entry in its
            # place: whatever fails on the way, the record keeps the data (`_NAME_SOURCES`).
            fields[f"s:{name}"] = _state_json(result)
            if _names_entry(result):
                keys, args = _naming_args(result, self.settings)
                naming_keys += keys
                naming_args += [f"s:{name}", *args]
            if result.settled:
                fields[f"settled:{name}"] = "1"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl)
            # By its SHA, not as a Script: redis-py precedes a pipeline holding a Script with a
            # SCRIPT EXISTS round trip.  On NOSCRIPT (a restarted or flushed Redis) it runs again.
            naming_at = len(pipe) if naming_args else None
            if naming_args:
                pipe.evalsha(self._name_sources.sha, len(naming_keys), *naming_keys, *naming_args)
            pipe.zadd(self._key("lookups"), {lookup.id: lookup.created_at})
            for source, task_id in lookup.tasks.items():
                pipe.set(self.task_key(task_id), _registry_entry(FETCH_TASK, lookup.id, source), ex=ttl)
            status_history.add_counts(pipe, self.settings, {"started": 1})
            if also is not None:
                also(pipe)
            if claim:
                pipe.set(
                    self.inflight_key(lookup.type, lookup.identifier),
                    lookup.id,
                    nx=True,
                    ex=self._claim_ttl(),
                )
            replies = pipe.execute(raise_on_error=naming_at is None)
        if naming_at is not None:
            if isinstance(replies[naming_at], redis.exceptions.NoScriptError):
                replies[naming_at] = self._name_sources(keys=naming_keys, args=naming_args)
            errors = [reply for reply in replies if isinstance(reply, Exception)]
            if errors:
                raise errors[0]
        claimed = replies[-1] if claim else True
        if claimed:
            return None
        running = self.claim_inflight(lookup.type, lookup.identifier, lookup.id)
        if running is not None:  # it joins that one: not a lookup started after all
            status_history.count(self.redis, self.settings, {"started": -1})
        return running

    def _claim_ttl(self) -> int:
        return int(self.settings.lookup_deadline + self.settings.defer_horizon + 60)

    def answered_key(self, lookup_id: str) -> str:
        """A cached answer's head as the previous release stored it (read until those expire)."""
        return self._key("answered", lookup_id)

    def answer_body_key(self, digest: str) -> str:
        """The previous release's shared body (read for its heads until they expire)."""
        return self._key("answer-body", digest)

    def answer_key(self, digest: str) -> str:
        """A shared answer body: `type\nidentifier\n` + the body's JSON members (create_answered)."""
        return self._key("answer", digest)

    def create_answered(self, lookup: Lookup, versions: tuple | None = None) -> bytes:
        """A lookup answered whole from the cache; returns its API JSON, to send as it is.

        It never changes again, so nothing of its own is stored: its id (answer_ids) seals its
        creation time, its priority and the digest of its body (sources, result, checks: nearly
        all of it), which is the same for every lookup answered from the same cache entries and is
        stored once under that digest.  `versions` names the entries the body came from, so a hot
        identifier's body is encoded once per process, not on every request.  The body is written
        (and its presence checked) at most once a BODY_CHECK_INTERVAL per process, so the
        answer itself usually costs no Redis round trip; its count in the status history is
        added up in memory (status_history.Tally).
        """
        retention = max(1, int(self.settings.lookup_retention))
        body = self._bodies.get(versions) if versions is not None else None
        if body is None:
            answer = lookup.to_dict()
            inner = encode_json({name: answer[name] for name in ANSWER_BODY_FIELDS})[1:-1]
            stored = f"{lookup.type}\n{lookup.identifier}\n".encode() + inner
            body = (inner, stored, hashlib.blake2b(stored, digest_size=answer_ids.DIGEST_BYTES).digest())
            if versions is not None:
                if len(self._bodies) >= ANSWER_BODIES_MAX:
                    self._bodies.clear()
                self._bodies[versions] = body
        inner, stored, digest = body
        self._keep_body(digest, stored, retention)
        # The id keeps the creation time to the millisecond: the answer says what GET will say.
        lookup.created_at = round(lookup.created_at, 3)
        lookup.deadline_at = lookup.created_at + self.settings.lookup_deadline
        lookup.completed_at = lookup.created_at
        lookup.id = self.answer_ids.issue(digest, lookup.created_at, lookup.priority)
        self.answered_counts.add({"answered": 1})
        head = encode_json(lookup.head())
        lookup.encoded = head[:-1] + b"," + inner + b"}"
        return lookup.encoded

    def _keep_body(self, digest: bytes, stored: bytes, retention: int) -> None:
        """Make sure the body outlives every id naming it (raises RedisError when it cannot).

        Written for 1.2 x retention and written again once a tenth of the retention has passed,
        so it ends >= 1.1 x retention after any id this process issued.  In between its presence
        is checked at most once a BODY_CHECK_INTERVAL (a command on every answer cost a fifth of
        the cached path's throughput), so a body lost with a restarted or flushed Redis is written
        again within that interval, and the key that seals ids is read again with it.
        """
        now = time.monotonic()
        renew = now - self._bodies_written.get(digest, -retention) > retention / 10
        if not renew and now - self._bodies_checked.get(digest, -retention) < self.BODY_CHECK_INTERVAL:
            return
        body_key = self.answer_key(digest.hex())
        if not renew:
            present = self.redis.exists(body_key)
            if len(self._bodies_checked) >= ANSWER_BODIES_MAX:
                self._bodies_checked.clear()
            self._bodies_checked[digest] = now
            if present:
                return
            self.answer_ids.reload()  # what lost the body may have lost the key too
        self.redis.set(body_key, stored, ex=int(retention * 1.2) + 1)
        # Only once it is surely written: a failed round trip leaves it due.
        for seen in (self._bodies_written, self._bodies_checked):
            if len(seen) >= ANSWER_BODIES_MAX:
                seen.clear()
            seen[digest] = now

    def _answered(self, lookup_id: str) -> Lookup | None:
        """A lookup answered from the cache, from its id and its shared body (None once past retention)."""
        ref = self.answer_ids.open(lookup_id)
        if ref is None or time.time() - ref.created_at > self.settings.lookup_retention:
            return None
        stored = self.redis.get(self.answer_key(ref.digest.hex()))
        if not stored:
            return None
        kind, identifier, inner = stored.split(b"\n", 2)
        created_at = ref.created_at
        head = Lookup(
            id=lookup_id,
            type=kind.decode(),
            identifier=identifier.decode(),
            priority=ref.priority,
            status=LookupStatus.COMPLETE,
            created_at=created_at,
            deadline_at=created_at + self.settings.lookup_deadline,
            completed_at=created_at,
            sources={},
        ).head()
        return _from_answer(encode_json(head)[:-1] + b"," + inner + b"}")

    def _answer(self, stored: bytes) -> Lookup | None:
        """A head the previous release stored (`answered:{id}`) with its body."""
        digest, _, head = stored.partition(b"\n")
        inner = self.redis.get(self.answer_body_key(digest.decode()))
        return _from_answer(head[:-1] + b"," + inner + b"}") if inner else None

    def discard(self, lookup: Lookup) -> None:
        """Remove a record that was written but never started (it joined a running lookup instead)."""
        task_keys = [self.task_key(task_id) for task_id in lookup.tasks.values()]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.record_key(lookup.id), *task_keys)
            pipe.zrem(self._key("lookups"), lookup.id)
            pipe.execute()

    def register_task(
        self, task_id: str, name: str, lookup_id: str | None, source: str | None = None
    ) -> None:
        """Remember a task id the service issued (so /api/tasks can tell it from a made-up one)."""
        entry = _registry_entry(name, lookup_id, source)
        self.redis.set(self.task_key(task_id), entry, ex=self.settings.lookup_record_ttl)

    def unsettled(self, lookup_id: str, sources: list[str]) -> list[str]:
        """Those of `sources` not settled yet in the lookup (none when the record is gone)."""
        flags = self.redis.hmget(self.record_key(lookup_id), ["total", *(f"settled:{s}" for s in sources)])
        if flags[0] is None:
            return []  # the record is gone (expired): nothing to call for
        return [source for source, flag in zip(sources, flags[1:], strict=True) if flag != b"1"]

    def is_settled(self, lookup_id: str, source: str) -> bool:
        return self.redis.hget(self.record_key(lookup_id), f"settled:{source}") == b"1"

    def task(self, task_id: str) -> dict | None:
        raw = self.redis.get(self.task_key(task_id))
        return _registry_read(raw) if raw else None

    def get(self, lookup_id: str) -> Lookup | None:
        """The lookup, or None if unknown or expired."""
        if answer_ids.looks_like_answer_id(lookup_id):
            return self._answered(lookup_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.record_key(lookup_id))
            pipe.get(self.answered_key(lookup_id))
            pipe.hgetall(self.alias_key(lookup_id))
            raw, answered, alias = pipe.execute()
        if answered:
            return self._answer(answered)
        if alias:
            return self._through_alias(lookup_id, alias)
        if not raw:
            return None
        return self._record(lookup_id, {k.decode(): v for k, v in raw.items()})

    def _record(self, lookup_id: str, values: dict[str, bytes]) -> Lookup:
        """A lookup record read back, with the data it names read in one more round trip (MGET)."""
        kind, identifier = values["type"].decode(), values["identifier"].decode()
        names = values["sources"].decode().split(",") if values.get("sources") else []
        states = {name: orjson.loads(values[f"s:{name}"]) for name in names}
        result = _result_from(values["result"]) if values.get("result") else None
        wanted = [(name, state["ref"]) for name, state in states.items() if "ref" in state]
        if result is not None and "base" in result:
            wanted.append(tuple(result["base"]))
        named = self._named_data(lookup_id, kind, identifier, wanted)
        sources = {}
        for name, state in states.items():
            if "ref" in state:
                data, origin = named[(name, state["ref"])]
            else:
                data, origin = state["entry"]["data"] if "entry" in state else state.get("data"), None
            sources[name] = _source_result(name, state, data, origin)
        if result is not None and "base" in result:
            base = named[tuple(result["base"])][0]
            data = _patch(base, result["patch"]) if isinstance(base, dict) else None
            result = {"data": data, "checks": result["checks"]}
        return Lookup(
            id=lookup_id,
            type=kind,
            identifier=identifier,
            priority=int(values["priority"]),
            status=LookupStatus(values["status"].decode()),
            created_at=float(values["created_at"]),
            deadline_at=float(values["deadline_at"]),
            sources=sources,
            tasks=orjson.loads(values.get("tasks", b"{}")),
            result=result,
            completed_at=float(values["completed_at"]) if values.get("completed_at") else None,
        )

    def _named_data(
        self, lookup_id: str, kind: str, identifier: str, wanted: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[dict | None, EntryVersion]]:
        """The data of each (source, ref) a record names, and its version, in one MGET: the cache
        entry while it holds that version, else its kept copy (cache_manager)."""
        versions = {
            (source, ref): EntryVersion.from_ref(ref, kind, source, identifier) for source, ref in wanted
        }
        if not versions:
            return {}
        raw = self.redis.mget([key for version in versions.values() for key in version.keys(self.settings)])
        named = {}
        for index, (wanted_ref, version) in enumerate(versions.items()):
            found, data = version.data_from(raw[2 * index], raw[2 * index + 1])
            if not found:  # outlived by its record: never, unless someone deleted it by hand
                log.warning("lookup %s: the data of %s (%s) is gone", lookup_id, *wanted_ref)
            named[wanted_ref] = (data, version)
        return named

    def statuses(self, record_ids: list[str]) -> list[LookupStatus | None]:
        """Each record's status, in one round trip: COMPLETE for one answered whole from the cache
        (its id says so), None for one unknown or expired.  Records only (a `work_id`): an alias
        is not followed."""
        with self.redis.pipeline(transaction=False) as pipe:
            for record_id in record_ids:
                pipe.hget(self.record_key(record_id), "status")
                pipe.exists(self.answered_key(record_id))
            replies = pipe.execute()
        return [
            self._answered_status(record_id)
            if answer_ids.looks_like_answer_id(record_id)
            else LookupStatus.COMPLETE
            if answered
            else LookupStatus(status.decode())
            if status
            else None
            for record_id, status, answered in zip(record_ids, replies[::2], replies[1::2], strict=True)
        ]

    def _answered_status(self, lookup_id: str) -> LookupStatus | None:
        ref = self.answer_ids.open(lookup_id)
        if ref is None or time.time() - ref.created_at > self.settings.lookup_retention:
            return None
        return LookupStatus.COMPLETE

    def source_states(self, wanted: list[tuple[str, list[str]]]) -> list[list[SourceResult]]:
        """The named sources' states of each (record id, source names), in one round trip; a source
        the record does not hold (or a record gone) is left out.  Records only, as `statuses`.
        States only: the data a record names in a cache entry is not read (data is None)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for record_id, names in wanted:
                pipe.hmget(self.record_key(record_id), [f"s:{name}" for name in names])
            replies = pipe.execute()
        found = []
        for (_, names), states in zip(wanted, replies, strict=True):
            values = [(name, orjson.loads(raw)) for name, raw in zip(names, states, strict=True) if raw]
            found.append([_source_result(name, value, value.get("data"), None) for name, value in values])
        return found

    def alias_key(self, alias_id: str) -> str:
        return self._key("alias", alias_id)

    def create_alias(self, alias_id: str, shared: Lookup, priority: int, created_at: float) -> Lookup:
        """A request joins `shared` (single flight): its own id, priority, times and call ids over
        the shared work, stored for as long as a record; returns the lookup as that request sees it.

        Its call ids are registered like a record's, naming the alias, so `/api/tasks/<id>` answers
        them without revealing the shared record; the real task id stays inside the registry entry.
        """
        # It lives as long as the record it shows, and cleanup takes it with that record: the same
        # time to live (from the record's creation) and the record's place in the cleanup index.
        ttl = max(1, int(self.settings.lookup_record_ttl - (created_at - shared.created_at)))
        tasks = {source: secrets.token_hex(16) for source in shared.tasks}
        deadline_at = created_at + self.settings.lookup_deadline
        fields = {
            "lookup_id": shared.id,
            "priority": priority,
            "created_at": created_at,
            "deadline_at": deadline_at,
            "tasks": orjson.dumps(tasks),
        }
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.alias_key(alias_id), mapping=fields)
            pipe.expire(self.alias_key(alias_id), ttl)
            pipe.zadd(self._key("lookups"), {alias_id: shared.created_at})
            for source, task_id in tasks.items():
                registry = _registry_entry(FETCH_TASK, alias_id, source, shared.tasks[source])
                pipe.set(self.task_key(task_id), registry, ex=ttl)
            pipe.execute()
        return _as_alias(shared, alias_id, priority, created_at, deadline_at, tasks)

    def _through_alias(self, alias_id: str, raw: dict) -> Lookup | None:
        values = {k.decode(): v for k, v in raw.items()}
        shared = self.get(values["lookup_id"].decode())
        if shared is None or shared.shared_id is not None:
            return None  # the shared record expired (or the alias is malformed): as unknown
        return _as_alias(
            shared,
            alias_id,
            int(values["priority"]),
            float(values["created_at"]),
            float(values["deadline_at"]),
            orjson.loads(values["tasks"]),
        )

    def set_source(
        self, lookup_id: str, result: SourceResult, replace_settled: bool = False
    ) -> tuple[bool, bool, int, int]:
        """Record a source's state; returns (applied, newly settled, settled count, source count).

        Idempotent: a source that already settled keeps its answer (a redelivered task may
        report twice), unless `replace_settled`.  A source the record does not list is not applied
        (it would count towards `done` and finalize the lookup early).
        """
        keys: list[str] = [self.record_key(lookup_id)]
        args: list[bytes | str] = [
            result.source,
            b"",
            "1" if result.settled else "0",
            "1" if replace_settled else "0",
        ]
        if _names_entry(result):  # it names the cache entry that holds its data (`_NAMED`)
            naming_keys, naming_args = _naming_args(result, self.settings)
            keys += naming_keys
            args += naming_args
        else:
            args[1] = _state_json(result)
        applied, newly, done, total = self._set_source(keys=keys, args=args)
        return bool(applied), bool(newly), int(done), int(total)

    def finish(
        self,
        lookup_id: str,
        status: LookupStatus,
        result: dict,
        sources: Mapping[str, SourceResult] | None = None,
    ) -> bool:
        """Move to `partial` or `complete` with the merged result; True if this call did it.

        `sources`: the lookup's sources as read back from its record; the result's data is then
        kept as a patch on the data of one the record names, when that is smaller (`_stored_result`).

        The lookup's first answer (from queued or running) is counted in the status history's
        current bucket with its latency since creation, by the same script (status_history's bins):
        a partial lookup completing later is not counted again.  Any other status is a ValueError.
        """
        if status not in (LookupStatus.PARTIAL, LookupStatus.COMPLETE):
            raise ValueError(f"a lookup finishes partial or complete, not {status}")
        now = time.time()
        bucket = status_history.bucket_key(self.settings, status_history.bucket_start(now))
        args = [
            str(status),
            _stored_result(result, sources),
            now,
            status_history.BUCKET_TTL_SECONDS,
            f"finished:{status}",
        ]
        return bool(
            self._finish(
                keys=[self.record_key(lookup_id), bucket], args=args + list(status_history.LATENCY_BOUNDS_MS)
            )
        )

    def delete_older_than(self, cutoff: float, event_key: Callable[[str], str]) -> int:
        """Beat cleanup: delete lookups created before `cutoff` with their task entries and event logs.

        Records also carry a TTL as a backstop; the index lets cleanup honour the retention
        setting exactly and take the task registry and event log along.
        """
        index = self._key("lookups")
        removed = 0
        while True:
            ids = [i.decode() for i in self.redis.zrangebyscore(index, "-inf", cutoff, start=0, num=500)]
            if not ids:
                return removed
            for lookup_id in ids:
                # An id is a record's or an alias's (a request that joined another's lookup).
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hget(self.record_key(lookup_id), "tasks")
                    pipe.hget(self.alias_key(lookup_id), "tasks")
                    own, aliased = pipe.execute()
                raw_tasks = own or aliased
                task_ids = list(orjson.loads(raw_tasks).values()) if raw_tasks else []
                keys = [
                    self.record_key(lookup_id),
                    self.alias_key(lookup_id),
                    event_key(lookup_id),
                    *map(self.task_key, task_ids),
                ]
                self.redis.unlink(*keys)
                removed += 1
            self.redis.zrem(index, *ids)

    def purge_type(self, identifier_type: str, event_key: Callable[[str], str]) -> int:
        """Beat cleanup: delete every lookup of this type (a CPF, which this version never records,
        left by an earlier one), with its event log, task ids, stored answer and single-flight lock.
        The cache entries its records name, kept copies included, go with Cache.purge_type."""
        recorded = self._ids_where(self._key("lookup", "*"), lambda pipe, key: pipe.hget(key, "type"))
        answered = self._ids_where(self._key("answered", "*"), lambda pipe, key: pipe.get(key))
        kind = identifier_type.encode()
        doomed = [lookup_id for lookup_id, value in recorded if value == kind]
        # A stored answer is "digest\n" + its head's JSON, which names the type.
        marker = b'"type":"' + kind + b'"'
        doomed += [
            lookup_id for lookup_id, value in answered if value and marker in value.partition(b"\n")[2]
        ]
        for lookup_id in doomed:
            raw_tasks = self.redis.hget(self.record_key(lookup_id), "tasks")
            task_ids = list(orjson.loads(raw_tasks).values()) if raw_tasks else []
            self.redis.unlink(
                self.record_key(lookup_id),
                self.answered_key(lookup_id),
                event_key(lookup_id),
                *map(self.task_key, task_ids),
            )
            self.redis.zrem(self._key("lookups"), lookup_id)
        # A lookup answered from the cache stores nothing of its own: its shared body goes, and
        # with it every id naming it reads as unknown.
        bodies = [
            self.answer_key(digest)
            for digest, value in self._ids_where(
                self._key("answer", "*"), lambda pipe, key: pipe.getrange(key, 0, 15)
            )
            if value and value.partition(b"\n")[0] == kind
        ]
        for start in range(0, len(bodies), 500):
            self.redis.unlink(*bodies[start : start + 500])
        locks = list(self.redis.scan_iter(match=self._key("inflight", identifier_type, "*"), count=1000))
        return len(doomed) + len(bodies) + (self.redis.unlink(*locks) if locks else 0)

    def _ids_where(self, pattern: str, read: Callable[[redis.client.Pipeline, bytes], object]) -> list[tuple]:
        """(lookup id, what `read` queued for its key) for every key matching `pattern`, 500 a round trip."""
        keys = list(self.redis.scan_iter(match=pattern, count=1000))
        found = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            with self.redis.pipeline(transaction=False) as pipe:
                for key in chunk:
                    read(pipe, key)
                values = pipe.execute()
            found += [
                (key.decode().rsplit(":", 1)[1], value) for key, value in zip(chunk, values, strict=True)
            ]
        return found

    def delete_stale_inflight(self) -> int:
        """Beat cleanup: drop single-flight entries (locks) whose lookup record is gone."""
        removed = 0
        for key in self.redis.scan_iter(match=self._key("inflight", "*"), count=1000):
            lookup_id = self.redis.get(key)
            if lookup_id is not None and not self.redis.exists(self.record_key(lookup_id.decode())):
                removed += self.redis.delete(key)
        return removed
