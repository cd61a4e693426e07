"""redis_broker: the fixed transport serves both plain and TLS broker URLs."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

import job_queue  # noqa: F401 - importing it installs the transport, as `celery -A job_queue` does
from enrich import redis_broker


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


# -- the atomic take, in process on the test Redis ------------------------------------------------


QUEUE = Queue("celery", Exchange("celery", type="direct"), routing_key="celery")


@pytest.fixture
def broker(redis_url):
    """A connection on the project's transport with the service's priority options, its own prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}:celery:"
    options = {"priority_steps": list(range(10)), "sep": ":", "queue_order_strategy": "priority"}
    options.update(global_keyprefix=prefix, visibility_timeout=60)
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options=options) as connection:
        yield connection, client, prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def _publish(connection, bodies: list[tuple[int, int]]) -> None:
    producer = Producer(connection.default_channel)
    for number, priority in bodies:
        producer.publish(
            {"n": number}, exchange=QUEUE.exchange, routing_key="celery", declare=[QUEUE], priority=priority
        )


def _consume(connection, count: int, no_ack: bool = False, timeout: float = 5) -> list:
    got = []
    with Consumer(
        connection,
        [QUEUE],
        callbacks=[lambda body, message: got.append((body.get("n"), message))],
        no_ack=no_ack,
    ):
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                pass
    return got


def test_a_take_is_recorded_unacknowledged_at_once_in_priority_order(broker):
    connection, client, prefix = broker
    _publish(connection, [(0, 9), (1, 0), (2, 5), (3, 0)])
    got = _consume(connection, 4)
    assert [n for n, _ in got] == [1, 3, 2, 0]  # priority 0 first, then first in, first out
    tags = {message.delivery_tag for _, message in got}
    assert {tag.decode() for tag in client.hkeys(f"{prefix}unacked")} == tags
    assert client.zcard(f"{prefix}unacked_index") == 4
    for _, message in got:
        message.ack()
    assert client.hlen(f"{prefix}unacked") == 0
    assert not client.exists(f"{prefix}celery:wake")  # no message left: no token either


def test_a_no_ack_consumer_is_not_recorded(broker):
    connection, client, prefix = broker
    _publish(connection, [(0, 5), (1, 5)])
    assert len(_consume(connection, 2, no_ack=True)) == 2
    assert client.hlen(f"{prefix}unacked") == 0 and client.zcard(f"{prefix}unacked_index") == 0


def test_messages_without_tokens_are_all_taken_promptly(broker):
    """Messages queued before this transport (no wake-up token) or whose tokens were lost: the first
    take after a BRPOP timeout gives every one left its token, so they do not drain one a second."""
    connection, client, prefix = broker
    _publish(connection, [(n, 5) for n in range(20)])
    client.delete(f"{prefix}celery:wake")
    began = time.monotonic()
    got = _consume(connection, 20)
    assert len(got) == 20
    assert time.monotonic() - began < 4, "one message a BRPOP timeout: the tokens were not restored"


def test_a_restored_or_purged_message_keeps_tokens_and_messages_equal(broker):
    connection, client, prefix = broker
    _publish(connection, [(n, 5) for n in range(3)])
    got = _consume(connection, 1)
    got[0][1].requeue()  # back to its queue, with a token
    assert client.llen(f"{prefix}celery:5") == 3 and client.llen(f"{prefix}celery:wake") == 3
    assert connection.default_channel.queue_purge("celery") == 3
    assert not client.exists(f"{prefix}celery:wake")


def test_a_message_the_script_cannot_read_is_handed_over_and_recorded_by_kombu(broker):
    """cjson refuses a lone surrogate escape that Python reads: the script hands the message over
    unrecorded and says so, and kombu's own record then keeps it unacknowledged."""
    connection, client, prefix = broker
    _publish(connection, [(0, 5)])
    raw = client.rpop(f"{prefix}celery:5")
    client.lpush(f"{prefix}celery:5", raw.replace(b'"headers": {}', b'"headers": {"x": "\\ud800"}', 1))
    got = _consume(connection, 1)
    assert len(got) == 1
    assert client.hexists(f"{prefix}unacked", got[0][1].delivery_tag)


def test_the_script_is_loaded_again_after_redis_forgets_it(broker):
    connection, client, prefix = broker
    _publish(connection, [(0, 5)])
    assert len(_consume(connection, 1)) == 1
    client.script_flush()  # as a restarted Redis would
    _publish(connection, [(1, 5)])
    assert [n for n, _ in _consume(connection, 1)] == [1]


def test_messages_naming_reads_queues_and_unacknowledged_messages(broker):
    connection, client, prefix = broker
    producer = Producer(connection.default_channel)
    for text in ("alpha", "beta"):
        producer.publish(
            {"id": text}, exchange=QUEUE.exchange, routing_key="celery", declare=[QUEUE], priority=5
        )
    key_prefix = prefix.removesuffix(":celery:")
    assert redis_broker.messages_naming(client, key_prefix, {"alpha", "beta", "gamma"}, 100) == {
        "alpha",
        "beta",
    }
    _consume(connection, 1)  # one of them now taken, not acknowledged
    assert redis_broker.messages_naming(client, key_prefix, {"alpha", "beta"}, 100) == {"alpha", "beta"}
    assert (
        redis_broker.messages_naming(client, key_prefix, {"alpha"}, 1) is None
    )  # more than the limit to read
