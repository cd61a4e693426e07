"""The embedded Valkey that `make run` starts: AOF keeps queued work across a restart."""

from __future__ import annotations

import redis

from devstack.embedded_redis import EmbeddedRedis, free_port


def test_restart_keeps_queued_messages(tmp_path):
    server = EmbeddedRedis(free_port(), tmp_path / "redis", appendonly=True)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.lpush("queue", *[f"task-{i}" for i in range(100)])
        client.close()
        server.stop()  # SIGTERM flushes the append-only file
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.llen("queue") == 100
        client.close()
    finally:
        server.stop()
