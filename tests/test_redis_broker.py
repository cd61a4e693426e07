"""redis_broker: the fixed transport serves both plain and TLS broker URLs."""

from __future__ import annotations

import pytest
from kombu import Connection

import job_queue  # noqa: F401 - importing it installs the transport, as `celery -A job_queue` does
import redis_broker


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6390/0", "rediss://127.0.0.1:6380/0?ssl_cert_reqs=required"]
)
def test_broker_urls_use_the_transport_that_survives_a_lost_broker(url):
    connection = Connection(url)
    try:
        assert type(connection.transport) is redis_broker.Transport
        assert connection.transport.Channel.QoS is redis_broker.QoS
    finally:
        connection.release()
