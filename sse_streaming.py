"""Lookup events: publishing from any process, a per-lookup replayable log, and the SSE stream.

Built on flask-sse's `Message` (its wire format).  Each event is appended to a capped Redis
Stream per lookup (with a TTL) and announced on a pub/sub channel in the same atomic step, so
the stream's entry id is the event's SSE `id:` and a reconnecting client can resume from
`Last-Event-ID` with no gap and no duplicate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import orjson
import redis
from flask import Response, current_app, request, stream_with_context
from flask_sse import Message

import redis_store
from settings import Settings

log = logging.getLogger("events")

EVENT_TYPES = ("snapshot", "source", "progress", "partial", "complete", "error")
FINAL_EVENT_TYPES = ("complete", "error")
STREAM_MAXLEN = 1000

# KEYS[1] the log stream.  ARGV: channel, type, data json, ttl seconds, maxlen.
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], id)
return id
"""


class EventLog:
    """Publishes lookup events and reads them back."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._publish = client.register_script(_PUBLISH)
        # Blocking reads need a socket timeout longer than their block time.
        self.blocking_redis = redis_store.connect(settings, socket_timeout=settings.sse_heartbeat_interval + 5)

    def stream_key(self, lookup_id: str) -> str:
        return redis_store.key(self.settings, "events", lookup_id)

    def channel(self, lookup_id: str) -> str:
        return redis_store.key(self.settings, "channel", lookup_id)

    def publish(self, lookup_id: str, event_type: str, data: dict) -> str | None:
        """Append an event to the lookup's log and announce it; returns its log id (None on failure).

        A failed publish is logged, not raised: the lookup record stays the source of truth.
        """
        payload = orjson.dumps({**data, "timestamp": time.time()})
        try:
            event_id = self._publish(
                keys=[self.stream_key(lookup_id)],
                args=[self.channel(lookup_id), event_type, payload, self.settings.lookup_record_ttl, STREAM_MAXLEN],
            )
        except redis.RedisError as error:
            log.warning("publish of %s for lookup %s failed: %s", event_type, lookup_id, error)
            return None
        return event_id.decode()

    def read_after(self, lookup_id: str, after: str = "0-0", block_ms: int | None = None) -> list[Message]:
        """Logged events after `after`, oldest first (waiting up to `block_ms` for one if given)."""
        key = self.stream_key(lookup_id)
        if block_ms is None:
            entries = self.redis.xrange(key, min=f"({after}" if after != "0-0" else "-")
        else:
            reply = self.blocking_redis.xread({key: after}, block=block_ms, count=100)
            entries = reply[0][1] if reply else []
        return [
            Message(fields[b"data"].decode(), type=fields[b"type"].decode(), id=entry_id.decode())
            for entry_id, fields in entries
        ]


def stream_response(events: EventLog, lookup_id: str, snapshot: Callable[[], dict]) -> Response:
    """An SSE response: a `snapshot`, the logged events after Last-Event-ID, then live ones.

    Following the log with XREAD from the last id seen gives replay and live with no gap and
    no duplicate.  Heartbeat comments keep proxies from closing an idle stream.
    """
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    heartbeat = current_app.extensions["settings"].sse_heartbeat_interval

    def generate() -> Iterator[str]:
        last = after
        yield ":" + " " * 2048 + "\n\n"  # flush headers and defeat proxy buffering at once
        yield str(Message(orjson.dumps({**snapshot(), "timestamp": time.time()}).decode(), type="snapshot"))
        while True:
            messages = events.read_after(lookup_id, last, block_ms=int(heartbeat * 1000))
            if not messages:
                yield ": heartbeat\n\n"
                continue
            for message in messages:
                last = message.id
                yield str(message)
                if message.type in FINAL_EVENT_TYPES:
                    return

    response = Response(stream_with_context(generate()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def init_app(app) -> None:
    app.extensions["events"] = EventLog(app.extensions["redis"], app.extensions["settings"])


def get_events() -> EventLog:
    return current_app.extensions["events"]
