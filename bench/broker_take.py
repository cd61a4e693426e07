"""Messages a second through the broker transport: kombu's own take against the project's atomic one.

Not a load benchmark of the service (it is not in `make bench`): a side-by-side measurement for
the README's row on the lost-task window.  It starts a private embedded Valkey, and for each
transport, alternating three times, publishes 5,000 small messages at mixed priorities and
consumes them all with acknowledgement, on the service's broker settings (priority steps, key
prefix, prefetch of one consumer).  kombu's take is one BRPOP and one pipeline (record); the
project's is one BRPOP on the wake-up list and one script (take and record); a publish is one
pipeline in both.

    .venv/bin/python -m bench.broker_take
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich import redis_broker
from enrich.celery_setup import celery_config
from enrich.settings import Settings

MESSAGES = 5_000


def run(url: str, transport: type, prefix: str) -> tuple[float, float]:
    """(publishes a second, takes a second) for one transport class."""
    settings = Settings.from_env({}, redis_url=url, key_prefix=prefix)
    options = celery_config(settings)["broker_transport_options"]
    queue = Queue("celery", Exchange("celery", type="direct"), routing_key="celery")
    with Connection(url, transport=transport, transport_options=options) as connection:
        producer = Producer(connection.default_channel)
        began = time.perf_counter()
        for n in range(MESSAGES):
            producer.publish(
                {"n": n}, exchange=queue.exchange, routing_key="celery", declare=[queue], priority=n % 10
            )
        published = time.perf_counter() - began
        seen = []

        def on_message(body, message):
            seen.append(body["n"])
            message.ack()

        began = time.perf_counter()
        with Consumer(connection, [queue], callbacks=[on_message], accept=["json"], prefetch_count=1):
            while len(seen) < MESSAGES:
                connection.drain_events(timeout=5)
        taken = time.perf_counter() - began
    return MESSAGES / published, MESSAGES / taken


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(free_port(), tmp, appendonly=False)
        server.start()
        try:
            results: dict[str, list[tuple[float, float]]] = {"kombu's take": [], "atomic take": []}
            for round_ in range(3):
                for name, transport in (
                    ("kombu's take", kombu_redis.Transport),
                    ("atomic take", redis_broker.Transport),
                ):
                    results[name].append(
                        run(server.url, transport, f"b{round_}{len(results[name])}{name[0]}")
                    )
        finally:
            server.stop()
    print(f"{MESSAGES} messages, 3 alternating rounds, median (range)")
    for name, runs in results.items():
        publish = [p for p, _ in runs]
        take = [t for _, t in runs]
        print(
            f"{name:>13}: publish {statistics.median(publish):,.0f}/s ({min(publish):,.0f}-{max(publish):,.0f}), "
            f"take+ack {statistics.median(take):,.0f}/s ({min(take):,.0f}-{max(take):,.0f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
