"""The project's Redis broker transport (kombu's, with two fixes) and result backend (Celery's, with one).

Fix 1, the lost-task window: a message is recorded unacknowledged in the same atomic step that
takes it off its queue.  kombu's own transport pops a message with one BRPOP over the priority
lists and records it in the unacked hash in a second command, so a worker killed between the two
lost it for good (celery/kombu#305, #1836; celery#7950), and a popped reply waiting in the
socket while the worker was busy was the same gap made longer.  A Lua script cannot block and
BRPOP cannot write a second key, so taking is split in two:

- every publish also pushes a wake-up token onto the queue's `<queue>:wake` list (one pipeline,
  the message first);
- a consumer blocks with BRPOP on the wake lists only (the same event-loop path, timeouts and
  health checks as kombu's BRPOP), then runs `_TAKE`, one script that pops the highest-priority
  message of its queues and records it in `unacked` and `unacked_index` as kombu's QoS would.
  The script is sent once, never retried (a retried take would take a second message).
  Each run also leaves each queue's wake list holding one token per message left, so a message
  without one (queued before this transport, a token lost with its consumer or on a closed
  channel) wakes a consumer at the next take anywhere, and after a BRPOP timeout (`brpop_timeout`,
  1 s) at the latest; tokens never outlive their messages.

Priorities (priority-major over the queues, as kombu's BRPOP key order), prefetch and the
visibility-timeout restore are unchanged: a message taken and then lost with its worker is in
the unacked index and the sweep (job_queue sets it to a fifth of VISIBILITY_TIMEOUT) sends it
again.  A no-ack consumer (Celery's control replies) is not recorded, as with kombu.

Fix 2, a worker must survive losing Redis while tasks are running.  With kombu 5.7.0, when a
worker loses its broker connection while it holds delivered but unacknowledged tasks (acks_late),
Celery collects the broken connection and then closes it; the close tries to push the in-memory
unacked tasks back through a connection pool it can no longer build, raises AttributeError, which
escapes Celery's `ignore_errors`, and the worker exits with "Unrecoverable error" instead of
reconnecting (tests/faults/test_redis_outage.py).  Skipping that push loses nothing: each of those
tasks is in the unacked index and the sweep redelivers it.

Result backend: Celery's subscribes to every sent task's result channel so that a caller could
block on `.get()`; nothing here ever does (task states are read with GET by /api/tasks), yet each
subscription holds a pub/sub connection per thread or greenlet.  `ResultBackend` never subscribes.

job_queue installs the transport for `redis://` and `rediss://`.  Test-only fault point:
BROKER_TAKE_PAUSE (seconds) pauses a consumer between taking a message and handing it to the
worker, and logs that it does, so tests/faults/test_broker_take.py can kill a worker inside the
window that used to lose the message.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from queue import Empty

import redis
from celery.backends.redis import RedisBackend
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger("broker")

WAKE_SUFFIX = "wake"  # `<queue>:wake`: one token per message published or restored

# KEYS: unacked hash, unacked index, then the wake list of each of the n queues, then the
# priority lists priority-major (for each priority step, one list per queue: BRPOP's key order).
# ARGV: now, n, steps, then per queue 1 to record what it takes as unacknowledged (0: a no-ack
# consumer), then per queue its expiry in ms (0: none).  Returns {queue number, message, 1 when
# recorded} or false.  The stored entry is kombu's `[message, exchange, routing key]` with the
# message's own bytes (never re-encoded: cjson would turn an empty list into an object).  A message
# cjson cannot read is handed over unrecorded, as kombu would hand it; a script error after the
# RPOP would lose it.  Every call leaves each queue's wake list holding one token per message
# left (at most 1,000 added a call): a shortfall (messages queued before this transport, a token
# lost with its consumer) heals at the next take, and tokens never outlive their messages.
_TAKE = """
local n, steps = tonumber(ARGV[2]), tonumber(ARGV[3])
local function list(p, q) return KEYS[2 + n + p * n + q] end
local function balance()
  for q = 1, n do
    local left, wake = 0, KEYS[2 + q]
    for p = 0, steps - 1 do left = left + redis.call('LLEN', list(p, q)) end
    if left == 0 then
      redis.call('DEL', wake)
    else
      local tokens = redis.call('LLEN', wake)
      if tokens > left then
        redis.call('LTRIM', wake, 0, left - 1)
      elseif tokens < left then
        local ones = {}
        for i = 1, math.min(left - tokens, 1000) do ones[i] = '1' end
        redis.call('LPUSH', wake, unpack(ones))
        local expires = tonumber(ARGV[3 + n + q])
        if expires > 0 then redis.call('PEXPIRE', wake, expires) end
      end
    end
  end
end
for p = 0, steps - 1 do
  for q = 1, n do
    local item = redis.call('RPOP', list(p, q))
    if item then
      local recorded = 0
      if ARGV[3 + q] == '1' then
        local ok, message = pcall(cjson.decode, item)
        if ok and type(message) == 'table' and type(message['properties']) == 'table' then
          local props = message['properties']
          local info = props['delivery_info']
          local tag = props['delivery_tag']
          if type(tag) == 'string' and type(info) == 'table' then
            redis.call('HSET', KEYS[1], tag,
              '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
            redis.call('ZADD', KEYS[2], ARGV[1], tag)
            recorded = 1
          end
        end
      end
      balance()
      return {q, item, recorded}
    end
  end
end
balance()
return false
"""


def _take_pause() -> float:
    """The test-only fault point's pause (BROKER_TAKE_PAUSE seconds; 0 outside the fault tests)."""
    try:
        return max(0.0, float(os.environ.get("BROKER_TAKE_PAUSE", "0") or 0))
    except ValueError:
        return 0.0


TAKE_PAUSE = _take_pause()  # read once per process: not on every take


class QoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._recorded: set[str] = set()  # delivery tags `_TAKE` already recorded as unacknowledged

    def append(self, message, delivery_tag):
        if delivery_tag in self._recorded:
            self._recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # kombu's bookkeeping, no second write
            return
        super().append(message, delivery_tag)

    def restore_unacked(self, client=None):
        if client is None and self.channel.connection.client is None:
            log.warning(
                "broker connection lost with %d task(s) delivered; they return after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return super().restore_unacked(client)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args, **kwargs):
        self._no_ack_queues: set[str] = set()
        self._taking: list[str] = []  # the queues of the BRPOP in flight
        self._get_no_ack = False
        super().__init__(*args, **kwargs)
        self._take_script = None

    def wake_key(self, queue: str) -> str:
        return f"{queue}{self.sep}{WAKE_SUFFIX}"

    # -- consuming -----------------------------------------------------------------------------
    def basic_consume(self, queue, no_ack, *args, **kwargs):
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue, no_ack=False, **kwargs):
        self._get_no_ack = no_ack
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._get_no_ack = False

    def _brpop_start(self, timeout=None):
        """Block on the queues' wake lists (kombu's BRPOP on the message lists, moved)."""
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._taking = list(queues)
        command_args = ["BRPOP", *(self.wake_key(queue) for queue in queues), timeout or 0]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(*command_args)

    def _brpop_read(self, **options):
        """A token or a timeout: either way take (and record) a message in one script."""
        try:
            try:
                self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._closing:  # the channel's close reads the BRPOP in flight: take nothing now
                raise Empty()
            taken = self._take(self._taking, record=[q not in self._no_ack_queues for q in self._taking])
            if taken is None:
                raise Empty()
            queue, payload = taken
            self._queue_cycle.rotate(queue)
            _fault_pause()
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _get(self, queue):
        """basic_get's synchronous take, atomic like the consumer's."""
        taken = self._take([queue], record=[not self._get_no_ack])
        with self.conn_or_acquire() as client:
            self._maybe_update_queues_expire(client, queue)
        if taken is None:
            raise Empty()
        return taken[1]

    def _take(self, queues: list[str], record: list[bool]) -> tuple[str, dict] | None:
        prefix = self.global_keyprefix or ""
        names = [self.unacked_key, self.unacked_index_key, *(self.wake_key(queue) for queue in queues)]
        names += [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        args = [time.time(), len(queues), len(self.priority_steps), *("1" if r else "0" for r in record)]
        args += [int(self._expires.get(queue, 0)) if self._expires else 0 for queue in queues]
        with self.conn_or_acquire() as client:
            reply = self._run_take(client, [prefix + name for name in names], args)
        if not reply:
            return None
        number, raw, recorded = reply
        payload = loads(bytes_to_str(raw))
        if recorded:
            self.qos._recorded.add(payload["properties"]["delivery_tag"])
        return queues[int(number) - 1], payload

    def _run_take(self, client, keys: list[str], args: list):
        """Run `_TAKE` once, never retried: redis-py retries a command whose reply timed out or was
        cut (retry_on_timeout), and a second run would take a second message, recorded but never
        handed over.  On one connection of the pool, with the keys as given (kombu's prefixing
        client would prefix only an EVALSHA's first key)."""
        pool = client.connection_pool
        connection = pool.get_connection()
        try:
            if self._take_script is None:
                self._take_script = _once(connection, "SCRIPT", "LOAD", _TAKE)
            try:
                return _once(connection, "EVALSHA", self._take_script, len(keys), *keys, *args)
            except kombu_redis.redis.exceptions.NoScriptError:  # Redis restarted: nothing ran
                self._take_script = _once(connection, "SCRIPT", "LOAD", _TAKE)
                return _once(connection, "EVALSHA", self._take_script, len(keys), *keys, *args)
        finally:
            pool.release(connection)

    # -- queue housekeeping: the wake list goes with its queue -------------------------------------
    def _purge(self, queue):
        size = super()._purge(queue)
        with self.conn_or_acquire() as client:
            client.delete(self.wake_key(queue))
        return size

    def _delete(self, queue, *args, **kwargs):
        super()._delete(queue, *args, **kwargs)
        with self.conn_or_acquire(client=kwargs.get("client")) as client:
            client.delete(self.wake_key(queue))

    def _maybe_update_queues_expire(self, client, queue):
        super()._maybe_update_queues_expire(client, queue)
        if self._expires and queue in self._expires:
            client.pexpire(self.wake_key(queue), self._expires[queue])

    # -- publishing and restoring: each message gets its wake-up token ---------------------------
    def _put(self, queue, message, **kwargs):
        """kombu's publish, with the message's wake-up token pushed right after it."""
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        commands = [("lpush", key, dumps(message)), ("lpush", self.wake_key(queue), 1)]
        expires = self._expires.get(queue) if self._expires else None
        if expires:
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps] + [self.wake_key(queue)]
            commands += [("pexpire", name, expires) for name in keys]
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            for name, *args in commands:
                batch.add(name, *args)
            return
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for name, *args in commands:
                getattr(pipe, name)(*args)
            pipe.execute()

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        for queue in self._lookup(exchange, routing_key):
            pipe.lpush(self.wake_key(queue), 1)


def _once(connection, *command):
    """One command on one connection, with no retry; a connection error drops the connection."""
    try:
        connection.send_command(*command)
        return connection.read_response()
    except (kombu_redis.redis.exceptions.ConnectionError, kombu_redis.redis.exceptions.TimeoutError):
        connection.disconnect()
        raise


def _fault_pause() -> None:
    if TAKE_PAUSE:
        log.warning("BROKER_TAKE_PAUSE: pausing %.2f s between taking a message and running it", TAKE_PAUSE)
        time.sleep(TAKE_PAUSE)


# -- the broker's layout, for the few parts of the service that must read it --------------------
DEFAULT_QUEUE = "celery"
PRIORITY_STEPS = list(range(10))  # kombu's priority lists: `<queue>` for 0, `<queue>:<n>` for n


def broker_prefix(key_prefix: str) -> str:
    """The broker's global key prefix for the service's KEY_PREFIX (job_queue.celery_config)."""
    return f"{key_prefix}:celery:"


def sweep_interval(visibility_timeout: int) -> int:
    """Seconds between the sweeps that send a dead worker's unacknowledged tasks again: a fifth of
    the visibility timeout, 1-10 s (kombu's default sweeps every ~100 s whatever the timeout)."""
    return max(1, min(10, visibility_timeout // 5))


def priority_lists(key_prefix: str, queue: str = DEFAULT_QUEUE) -> list[str]:
    """The Redis lists of `queue`, most urgent first (kombu's `_q_for_pri`)."""
    prefix = broker_prefix(key_prefix)
    return [prefix + (queue if step == 0 else f"{queue}:{step}") for step in PRIORITY_STEPS]


def message_text(message: dict) -> str | None:
    """A broker message's (kombu's payload's) body as text, to look for an id in; None if unreadable."""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return body.decode() if isinstance(body, bytes) else str(body)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def mentions(message: dict, text: str) -> bool:
    """Whether a broker message mentions `text` in its task's arguments (an unreadable one may)."""
    body = message_text(message)
    return body is None or text in body


SCAN_MAX = 10_000  # messages messages_naming reads at most


def messages_naming(client, key_prefix: str, texts: set[str], limit: int | None = None) -> set[str] | None:
    """Those of `texts` that a message still to run mentions: queued (any priority), or taken by a
    worker and not acknowledged (running, or lost with its worker and owed a redelivery by the
    sweep).  None when more than `limit` messages would have to be read, or one cannot be: any of
    `texts` may be among them (`limit`: SCAN_MAX unless given)."""
    limit = SCAN_MAX if limit is None else limit
    lists, unacked = priority_lists(key_prefix), broker_prefix(key_prefix) + Channel.unacked_key
    with client.pipeline(transaction=False) as pipe:
        for name in lists:
            pipe.llen(name)
        pipe.hlen(unacked)
        if sum(pipe.execute()) > limit:
            return None
    # One snapshot (MULTI): a sweep moving a task from unacked back to its queue between two
    # reads would hide it from both.
    with client.pipeline(transaction=True) as pipe:
        for name in lists:
            pipe.lrange(name, 0, -1)
        pipe.hvals(unacked)
        *queued, taken = pipe.execute()
    named: set[str] = set()
    for raw, entry in [(raw, False) for reply in queued for raw in reply] + [(raw, True) for raw in taken]:
        try:
            value = loads(bytes_to_str(raw))
            body = message_text(value[0] if entry else value)
        except (ValueError, IndexError, KeyError, TypeError):
            body = None
        if body is None:
            return None
        named.update(text for text in texts if text in body)
    return named


class Transport(kombu_redis.Transport):
    Channel = Channel


class ResultBackend(RedisBackend):
    def on_task_call(self, producer, task_id):
        """Do not subscribe to the task's result: the service never blocks on one."""


def result_backend_url(redis_url: str) -> str:
    """The `result_backend` setting naming this backend on `redis_url` (Celery's "class+url" form)."""
    return f"{__name__}:ResultBackend+{redis_url}"


def install() -> None:
    """Make `redis://` and `rediss://` (TLS) broker URLs use this transport in this process."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"


def queue_depths(client: redis.Redis, key_prefix: str) -> dict[str, int]:
    """Messages waiting on the broker per API priority (10 most urgent), for KEY_PREFIX `key_prefix`."""
    with client.pipeline(transaction=False) as pipe:
        for name in priority_lists(key_prefix):
            pipe.llen(name)
        lengths = pipe.execute()
    return {str(10 - level): int(length) for level, length in enumerate(lengths)}
