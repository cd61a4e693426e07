"""Calls waiting for their time (a rate-limit token, a retry backoff, a lookup deadline).

They wait in a Redis sorted set scored by due time, not as Celery ETA/countdown tasks: with
the Redis broker an ETA beyond the visibility timeout is redelivered again and again, and ETA
tasks sit in a worker's memory.  A dispatcher thread in every worker moves due entries onto
the broker.  Taking entries is a lease, not a pop: a dispatcher that dies between taking and
sending loses nothing, since the entry becomes due again when its lease ends (tasks are
idempotent, so a rare second send is harmless).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import orjson
import redis

from enrich import redis_store, status_history
from enrich.settings import Settings

log = logging.getLogger("deferred")

# KEYS[1] the set.  ARGV: now, limit, lease seconds.  Returns the due members, now leased.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), member)
end
return due
"""

LEASE_SECONDS = 30.0


class DeferredCalls:
    """The sorted set of deferred task sends."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.key = redis_store.key(settings, "deferred")
        self._take = client.register_script(_TAKE_DUE)

    @staticmethod
    def _member(call_id: str, task: str, args: list, options: dict | None) -> bytes:
        return orjson.dumps({"id": call_id, "task": task, "args": args, "options": options or {}})

    def add(
        self,
        due_at: float,
        task: str,
        args: list,
        options: dict | None = None,
        call_id: str | None = None,
        pipe: redis.client.Pipeline | None = None,
        rate_limit_wait: bool = False,
    ) -> None:
        """Send task `task` with `args` (and apply_async `options`) at `due_at` (epoch seconds).

        `call_id` names a call that may be cancelled later (same task, args and options); with
        `pipe`, the add rides along with that pipeline's round trip.  A `rate_limit_wait` (a call
        waiting for its source's token) is counted in the status history, in the same round trip.
        """
        member = self._member(call_id or uuid.uuid4().hex, task, args, options)
        if not rate_limit_wait:
            (pipe or self.redis).zadd(self.key, {member: due_at})
            return
        if pipe is not None:
            pipe.zadd(self.key, {member: due_at})
            status_history.add_counts(pipe, self.settings, {"rate_limit_waits": 1})
            return
        with self.redis.pipeline(transaction=False) as own:
            own.zadd(self.key, {member: due_at})
            status_history.add_counts(own, self.settings, {"rate_limit_waits": 1})
            added, *_ = own.execute(raise_on_error=False)  # only the add's own error matters
        if isinstance(added, Exception):
            raise added

    def cancel(self, call_id: str, task: str, args: list, options: dict | None = None) -> bool:
        """Drop a call added with `call_id` before it is sent; False if it is gone already."""
        return bool(self.redis.zrem(self.key, self._member(call_id, task, args, options)))

    def take_due(self, limit: int = 100, now: float | None = None) -> list[tuple[bytes, dict]]:
        """Lease the entries due by `now`; call `done(member)` after sending each."""
        members = self._take(keys=[self.key], args=[now or time.time(), limit, LEASE_SECONDS])
        return [(member, orjson.loads(member)) for member in members]

    def done(self, member: bytes) -> None:
        self.redis.zrem(self.key, member)

    def pending(self) -> int:
        return int(self.redis.zcard(self.key))

    def naming(self, ids: set[str], limit: int) -> set[str] | None:
        """Those of `ids` that some waiting call names (in its arguments), or None when more than
        `limit` calls wait (too many to read each time: the caller assumes any may be named)."""
        if self.redis.zcard(self.key) > limit:
            return None
        named: set[str] = set()
        for raw in self.redis.zrange(self.key, 0, -1):
            args = orjson.loads(raw).get("args") or []
            named.update(value for value in args if isinstance(value, str) and value in ids)
        return named


class Dispatcher(threading.Thread):
    """Background thread that sends due deferred calls with `send(task, args, options)`."""

    def __init__(
        self,
        deferred: DeferredCalls,
        send: Callable[[str, list, dict], None],
        interval: float,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="deferred-dispatcher", daemon=True)
        self.deferred = deferred
        self.send = send
        self.interval = interval
        self.on_tick = on_tick
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.on_tick:
                    self.on_tick()
                self.dispatch_due()
            except redis.RedisError as error:
                log.warning("deferred dispatcher cannot reach Redis: %s", error)
            except Exception:  # noqa: BLE001 - the thread must survive a bad entry or a broker hiccup
                log.exception("deferred dispatcher failed a round")
            self.stopping.wait(self.interval)

    def dispatch_due(self) -> int:
        """Send every due entry once; returns how many were sent."""
        sent = 0
        while True:
            batch = self.deferred.take_due()
            for member, entry in batch:
                self.send(entry["task"], entry["args"], entry["options"])
                self.deferred.done(member)
                sent += 1
            if len(batch) < 100:
                return sent

    def stop(self) -> None:
        self.stopping.set()
