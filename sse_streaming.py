"""Lookup events over Server-Sent Events: a replayable per-lookup log and streams that share one subscription.

Keeps flask-sse's `Message` (the wire format) and its blueprint API (`publish`, `messages`,
`stream`), and closes what flask-sse 1.0.0 leaves open, which is why the streaming itself is
hand-written here rather than taken from the library:

- Every event is appended to a capped Redis Stream per lookup (with a TTL) and announced in the
  same Lua call, so the stream entry id is the event's SSE `id:`.  A client that connects late or
  reconnects with `Last-Event-ID` gets exactly the events it missed (flask-sse replays nothing
  and drops what is published while a browser connects).
- Each process holds ONE pub/sub connection for all its streams (`EventHub`), instead of one
  connection per stream that outlives the stream; publishing reuses the app's connection pool.
- Each announcement carries the id of the entry before it, so a stream delivers it directly when
  it follows the last id it sent, and reads the gap from the log when it does not (a missed
  announcement, a Redis reconnect): no gap and no duplicate between replay and live.
- Headers and a `snapshot` go out at once, heartbeat comments keep idle streams alive, and a
  stream exists only for a lookup the service created (404 otherwise).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson
import redis
from flask import Response, request
from flask_sse import Message, ServerSentEventsBlueprint

from enrich import metrics, redis_store
from enrich.api_errors import ApiError
from enrich.lookups import MAX_LOOKUP_ID_LENGTH, Lookup, alias_head
from enrich.services import services
from enrich.settings import Settings

log = logging.getLogger("events")

EVENT_TYPES = ("snapshot", "source", "progress", "partial", "complete", "error")
FINAL_EVENT_TYPES = ("complete", "error")
STREAM_MAXLEN = 1000
RECONNECT_MS = 1000  # the `retry:` a browser waits before reconnecting a dropped stream
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

# KEYS[1] the log stream.  ARGV: hub channel, ttl seconds, maxlen, lookup id, then a type and a
# data json per event.  Each announcement is "lookup id \n previous entry id \n entry id \n type \n data".
# Returns the last entry id.
_PUBLISH = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if last[1] then prev = last[1][1] end
for i = 5, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  redis.call('PUBLISH', ARGV[1], ARGV[4] .. '\\n' .. prev .. '\\n' .. id .. '\\n' .. ARGV[i] .. '\\n' .. ARGV[i + 1])
  prev = id
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return prev
"""


def _order(event_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = event_id.partition("-")
    return int(milliseconds), int(sequence or 0)


class EventLog:
    """Publishes lookup events (from any process) and reads them back from the per-lookup log."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._publish = client.register_script(_PUBLISH)

    @property
    def hub_channel(self) -> str:
        return redis_store.key(self.settings, "events")

    def stream_key(self, lookup_id: str) -> str:
        return redis_store.key(self.settings, "events", lookup_id)

    def publish(self, lookup_id: str, event_type: str, data: dict) -> str | None:
        """Append an event to the lookup's log and announce it; returns its log id (None on failure).

        A failed publish is logged, not raised: the lookup record stays the source of truth, and
        a stream that missed the event still shows the state in its next snapshot.
        """
        return self.publish_many(lookup_id, [(event_type, data)])

    def publish_many(
        self, lookup_id: str, events: list[tuple[str, dict]], ttl: int | None = None
    ) -> str | None:
        """`publish` for several events of one lookup, in order, in one round trip; the last one's id.

        The log then expires `ttl` seconds on (default: with the lookup record).
        """
        now = time.time()
        args: list = [self.hub_channel, ttl or self.settings.lookup_record_ttl, STREAM_MAXLEN, lookup_id]
        for event_type, data in events:
            args += [event_type, orjson.dumps({**data, "timestamp": now})]
        try:
            event_id = self._publish(keys=[self.stream_key(lookup_id)], args=args)
        except redis.RedisError as error:
            kinds = ", ".join(event_type for event_type, _ in events)
            log.warning("publish of %s for lookup %s failed: %s", kinds, lookup_id, error)
            return None
        metrics.events_published([event_type for event_type, _ in events])
        return event_id.decode()

    def read_after(self, lookup_id: str, after: str = "0-0") -> list[Message]:
        """Logged events after `after`, oldest first."""
        start = "-" if after == "0-0" else f"({after}"
        entries = self.redis.xrange(self.stream_key(lookup_id), min=start)
        return [
            Message(fields[b"data"].decode(), type=fields[b"type"].decode(), id=entry_id.decode())
            for entry_id, fields in entries
        ]


@dataclass(frozen=True)
class Notice:
    """One announcement from the hub: an event and the id of the log entry before it."""

    previous_id: str
    message: Message


RESYNC = object()  # the hub reconnected: announcements may have been missed, read the log


@dataclass(eq=False)
class Listener:
    """One open stream's inbox for its lookup's announcements."""

    lookup_id: str
    inbox: queue.Queue = field(default_factory=queue.Queue)


class EventHub:
    """One pub/sub subscription per process, fanned out to the streams open in it.

    A thread (a greenlet under gunicorn's gevent worker) reads the hub channel and puts each
    announcement into the inboxes of the streams following that lookup; announcements for
    lookups nobody here follows are dropped.  On a lost connection it reconnects with backoff
    and tells every stream to re-read its log.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel = redis_store.key(settings, "events")
        self._lock = threading.Lock()
        self._listeners: dict[str, set[Listener]] = {}
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._subscribed_once = False
        self.reconnects = 0  # subscriptions renewed after a lost connection
        self.delivered = 0

    def listen(self, lookup_id: str) -> Listener:
        """Register a stream for a lookup; waits (briefly) until the subscription is live."""
        self._ensure_running()
        listener = Listener(lookup_id)
        with self._lock:
            self._listeners.setdefault(lookup_id, set()).add(listener)
        metrics.stream_opened()
        self._ready.wait(self.settings.redis_socket_timeout)
        return listener

    def close(self, listener: Listener) -> None:
        """Forget a stream (idempotent)."""
        with self._lock:
            followers = self._listeners.get(listener.lookup_id)
            known = followers is not None and listener in followers
            if known:
                followers.discard(listener)
                if not followers:
                    del self._listeners[listener.lookup_id]
        if known:  # a second close of the same stream must not count it twice
            metrics.stream_closed()

    def stats(self) -> dict:
        with self._lock:
            streams = sum(len(followers) for followers in self._listeners.values())
            return {
                "open_streams": streams,
                "lookups_followed": len(self._listeners),
                "subscribed": self._ready.is_set(),
                "reconnects": self.reconnects,
                "delivered": self.delivered,
            }

    def stop(self) -> None:
        self._stopping.set()

    def _ensure_running(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()  # a forked child starts its own subscriber
            self._ready.clear()
            self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        redis_store.follow_channel(
            self.settings, self.channel, self._stopping, self._dispatch, self._subscribed, self._lost
        )

    def _subscribed(self) -> None:
        if self._subscribed_once:
            self.reconnects += 1
        self._subscribed_once = True
        self._ready.set()
        self._broadcast(RESYNC)  # announcements may have been missed: every stream re-reads its log

    def _lost(self, error: Exception, backoff: float) -> None:
        self._ready.clear()
        log.warning("event hub lost Redis (%s); reconnecting in %.2f s", error, backoff)

    def _dispatch(self, raw: bytes) -> None:
        try:
            lookup_id, previous_id, event_id, event_type, data = raw.decode().split("\n", 4)
        except (UnicodeDecodeError, ValueError):
            log.warning("ignoring a malformed announcement on %s", self.channel)
            return
        with self._lock:
            followers = list(self._listeners.get(lookup_id, ()))
        if not followers:
            return
        notice = Notice(previous_id, Message(data, type=event_type, id=event_id))
        for listener in followers:
            listener.inbox.put(notice)
        self.delivered += len(followers)

    def _broadcast(self, item: object) -> None:
        with self._lock:
            followers = [listener for group in self._listeners.values() for listener in group]
        for listener in followers:
            listener.inbox.put(item)


def follow(events: EventLog, listener: Listener, after: str, heartbeat: float) -> Iterator[Message | None]:
    """Logged events after `after`, then live ones, until a final event; None means "send a heartbeat".

    The listener must be registered before this starts, so nothing published meanwhile is lost.
    Live announcements that continue from the last id sent go out directly; anything else (an
    earlier id already replayed, a gap, a hub reconnect, a quiet heartbeat period) reads the log.
    A Redis error while reading keeps the stream open: the next announcement or heartbeat retries.
    """
    last = after
    read_log = True
    while True:
        if read_log:
            try:
                batch = events.read_after(listener.lookup_id, last)
            except redis.RedisError as error:
                log.warning("reading events of lookup %s failed: %s", listener.lookup_id, error)
                batch = []
        for message in batch:
            last = message.id
            yield message
            if message.type in FINAL_EVENT_TYPES:
                return
        try:
            item = listener.inbox.get(timeout=heartbeat)
        except queue.Empty:
            yield None
            read_log, batch = True, []
            continue
        if isinstance(item, Notice) and item.previous_id == last:
            read_log, batch = False, [item.message]
        elif isinstance(item, Notice) and _order(item.message.id) <= _order(last):
            read_log, batch = False, []  # already sent by the replay
        else:
            read_log, batch = True, []


def _last_event_id() -> str:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    # A stream entry id is two unsigned 64-bit numbers: a larger part is malformed, not a Redis error.
    if not _EVENT_ID.match(raw) or any(int(part) >= 2**64 for part in raw.split("-")):
        raise ApiError(
            400,
            "invalid_request",
            "Last-Event-ID must be an event id such as 1700000000000-0",
            "last_event_id",
        )
    return raw


class LookupEventsBlueprint(ServerSentEventsBlueprint):
    """flask-sse's blueprint API over the lookup event logs; a channel is a lookup id."""

    @property
    def redis(self) -> redis.Redis:
        """The app's shared client (flask-sse opens a new connection on every access)."""
        return services().redis

    def publish(self, data, type=None, id=None, retry=None, channel="sse") -> str | None:  # noqa: A002
        """Append an event to lookup `channel`'s log and announce it; the log assigns the id."""
        return services().events.publish(
            channel, type or "message", data if isinstance(data, dict) else {"data": data}
        )

    def messages(self, channel="sse", last_event_id: str = "0-0") -> Iterator[Message]:
        """The lookup's events after `last_event_id`, then live ones, until `complete` or `error`."""
        hub, events = services().event_hub, services().events
        listener = hub.listen(channel)
        try:
            for message in follow(
                events, listener, last_event_id, services().settings.sse_heartbeat_interval
            ):
                if message is not None:
                    yield message
        finally:
            hub.close(listener)

    def stream(self, lookup_id: str) -> Response:
        """`GET /api/lookups/<id>/events`: snapshot, replay after Last-Event-ID, then live events.

        A request that joined another's lookup (an alias) follows the shared lookup's log, with
        the lookup's own fields of its `partial` and `complete` events made its own.
        """
        lookup = services().lookups.get(lookup_id) if len(lookup_id) <= MAX_LOOKUP_ID_LENGTH else None
        rewrite = None
        if lookup is not None and lookup.shared_id is not None:
            rewrite = functools.partial(_as_seen_by, lookup)
        return self.stream_channel(
            lookup.work_id if lookup is not None else lookup_id,
            lambda: lookup.to_dict() if lookup is not None else None,
            lambda snapshot: snapshot["status"] == "complete",
            "no lookup with this id (unknown or expired)",
            rewrite,
        )

    def stream_channel(
        self,
        channel: str,
        snapshot_of: Callable[[], dict | None],
        finished: Callable[[dict], bool],
        not_found: str,
        rewrite: Callable[[Message], Message] | None = None,
    ) -> Response:
        """A stream of one event log (a lookup's, a batch's): `snapshot_of()` (None: 404), the
        events after Last-Event-ID, then live ones until a final event.  When `finished(snapshot)`,
        the missed events and a closing `complete` go out at once and the stream ends.  `rewrite`
        changes each logged event on its way out (an alias's view of a shared lookup)."""
        after = _last_event_id()
        snapshot = snapshot_of() if len(channel) <= MAX_LOOKUP_ID_LENGTH else None
        if snapshot is None:
            raise ApiError(404, "not_found", not_found)
        hub, events = services().event_hub, services().events
        heartbeat = services().settings.sse_heartbeat_interval
        if finished(snapshot):
            missed = events.read_after(channel, after)
            return self._finished_response(snapshot, [rewrite(m) for m in missed] if rewrite else missed)
        listener = hub.listen(channel)

        def generate() -> Iterator[str]:
            yield _snapshot_event(snapshot)
            for message in follow(events, listener, after, heartbeat):
                if message is None:
                    yield ": heartbeat\n\n"
                else:
                    yield str(rewrite(message) if rewrite else message)

        response = _event_stream(generate())
        response.call_on_close(lambda: hub.close(listener))
        return response

    @staticmethod
    def _finished_response(snapshot: dict, missed: list[Message]) -> Response:
        """A complete lookup: snapshot and the missed events, ending with `complete` even when the
        log no longer holds it (trimmed or expired)."""
        events = [_snapshot_event(snapshot), *(str(message) for message in missed)]
        if not any(message.type in FINAL_EVENT_TYPES for message in missed):
            events.append(
                str(Message(orjson.dumps({**snapshot, "timestamp": time.time()}).decode(), type="complete"))
            )
        return _event_stream(iter(events))


def _as_seen_by(lookup: Lookup, message: Message) -> Message:
    """A shared lookup's event as the request that joined it sees it (its own id, priority, times)."""
    if message.type not in ("partial", "complete"):
        return message  # `source` and `progress` name no lookup
    data = alias_head(orjson.loads(message.data), lookup)
    return Message(orjson.dumps(data).decode(), type=message.type, id=message.id)


def _snapshot_event(snapshot: dict) -> str:
    data = orjson.dumps({**snapshot, "timestamp": time.time()}).decode()
    return str(Message(data, type="snapshot", retry=RECONNECT_MS))


def _event_stream(chunks: Iterator[str]) -> Response:
    response = Response(chunks, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


sse = LookupEventsBlueprint("sse", __name__)
sse.add_url_rule("/api/lookups/<lookup_id>/events", endpoint="stream", view_func=sse.stream)
