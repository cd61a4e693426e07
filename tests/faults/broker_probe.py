"""The service's Celery app with one extra task that notes it ran: the worker killed by test_broker_take.py.

`celery -A broker_probe worker` (run from this directory) is the service's own worker (job_queue's
app, settings and broker transport) plus `probe.note`, which adds its number to a Redis set, so the
test can count which of the tasks it sent ever ran.  With PROBE_STOCK_TAKE=1 the worker takes
messages with kombu's own Redis transport instead (BRPOP, then a second command recording the
message as unacknowledged), with the same test-only pause (BROKER_TAKE_PAUSE) in its gap: the
window the project's transport closes, shown to lose tasks.
"""

from __future__ import annotations

import os

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from enrich import redis_broker
from enrich.services import services
from job_queue import celery_app as app  # installs the project's transport

DONE_KEY = f"{app.settings.key_prefix}:probe:done"


class StockChannel(kombu_redis.Channel):
    """kombu 5.7's `_brpop_read`, with the fault point's pause between the pop and the record."""

    def _brpop_read(self, **options):
        try:
            reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            if not reply:
                raise kombu_redis.Empty()
            dest, item = reply
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            redis_broker._fault_pause()
            self.connection._deliver(loads(bytes_to_str(item)), dest)  # QoS.append records it here
            return True
        finally:
            self._in_poll = None


class StockTransport(kombu_redis.Transport):
    Channel = StockChannel


if os.environ.get("PROBE_STOCK_TAKE") == "1":
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:StockTransport"


@app.task(name="probe.note", ignore_result=True)
def note(number: int) -> None:
    services(app.flask_app).redis.sadd(DONE_KEY, number)
