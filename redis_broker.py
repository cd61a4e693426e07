"""kombu's Redis transport with one fix: a worker must survive losing Redis while tasks are running.

With kombu 5.7.0, when a worker loses its broker connection while it holds delivered but
unacknowledged tasks (acks_late), Celery collects the broken connection and then closes it; the
close tries to push the in-memory unacked tasks back through a connection pool it can no longer
build (its transport's client is already gone), raises AttributeError, which escapes Celery's
`ignore_errors`, and the worker exits with "Unrecoverable error" instead of reconnecting
(tests/faults/test_redis_outage.py catches it).  Skipping that push loses nothing: each of those
tasks is also in the unacked index in Redis, and the visibility-timeout sweep (job_queue sets it
to a fifth of VISIBILITY_TIMEOUT) redelivers it.  job_queue installs this transport for `redis://`.
"""

from __future__ import annotations

import logging

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger("broker")


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client=None):
        if client is None and self.channel.connection.client is None:
            log.warning("broker connection lost with %d task(s) delivered; they return after the visibility "
                        "timeout", len(self._delivered))
            self._delivered.clear()
            return None
        return super().restore_unacked(client)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make `redis://` broker URLs use this transport in this process."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
