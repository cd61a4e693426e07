"""kombu's Redis transport and Celery's Redis result backend, each with one fix.

Transport: a worker must survive losing Redis while tasks are running.

With kombu 5.7.0, when a worker loses its broker connection while it holds delivered but
unacknowledged tasks (acks_late), Celery collects the broken connection and then closes it; the
close tries to push the in-memory unacked tasks back through a connection pool it can no longer
build (its transport's client is already gone), raises AttributeError, which escapes Celery's
`ignore_errors`, and the worker exits with "Unrecoverable error" instead of reconnecting
(tests/faults/test_redis_outage.py catches it).  Skipping that push loses nothing: each of those
tasks is also in the unacked index in Redis, and the visibility-timeout sweep (job_queue sets it
to a fifth of VISIBILITY_TIMEOUT) redelivers it.  job_queue installs this transport for `redis://` and `rediss://`.

Result backend: Celery's subscribes to every sent task's result channel so that a caller could
block on `.get()`; nothing here ever does (task states are read with GET by /api/tasks), yet each
subscription holds a pub/sub connection per thread or greenlet, so a web process under load
opened one Redis connection per concurrent request.  `ResultBackend` never subscribes.
"""

from __future__ import annotations

import logging

from celery.backends.redis import RedisBackend
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger("broker")


class QoS(kombu_redis.QoS):
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
