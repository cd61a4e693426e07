"""The bytes that batches hold in Redis: a cap for all of them and a smaller share per client address.

A batch keeps its lines, items and results in Redis for BATCH_RETENTION (7 days), and the embedded
Redis has no `maxmemory`: without a cap, a client posting big batches of junk could fill the
machine's memory within the hour limits (30 uploads of 10,000 413-character rows: +142 MB).  Each
batch reserves what it will store when it is created (its line entries, queue and settled items,
as written, which is what grows with the upload; Redis's own overhead per entry is measured in
docs and README), and gives it back when cleanup deletes it.

Redis, `{prefix}:batches:storage` (a hash, no TTL: one field per live batch and per client address
holding one, each removed with the last of them): `all` the bytes reserved, `client:<address>` a
client's, `batch:<id>` "address|bytes" of one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from enrich import redis_store
from enrich.settings import Settings

# KEYS[1] storage hash.  ARGV: batch id, client, bytes, cap for all, cap per client.
# Returns 0 (reserved), 1 (the cap for all is reached) or 2 (the client's share is).
_RESERVE = """
local size = tonumber(ARGV[3])
local all = tonumber(redis.call('HGET', KEYS[1], 'all') or '0')
local mine = tonumber(redis.call('HGET', KEYS[1], 'client:' .. ARGV[2]) or '0')
if all + size > tonumber(ARGV[4]) then return 1 end
if mine + size > tonumber(ARGV[5]) then return 2 end
redis.call('HINCRBY', KEYS[1], 'all', size)
redis.call('HINCRBY', KEYS[1], 'client:' .. ARGV[2], size)
redis.call('HSET', KEYS[1], 'batch:' .. ARGV[1], ARGV[2] .. '|' .. ARGV[3])
return 0
"""

# KEYS[1] storage hash.  ARGV: batch id.  Gives a batch's reservation back (once); returns its bytes.
_RELEASE = """
local entry = redis.call('HGET', KEYS[1], 'batch:' .. ARGV[1])
if not entry then return 0 end
local client, size = string.match(entry, '^(.*)|(%d+)$')
size = tonumber(size)
redis.call('HDEL', KEYS[1], 'batch:' .. ARGV[1])
if redis.call('HINCRBY', KEYS[1], 'all', -size) <= 0 then redis.call('HDEL', KEYS[1], 'all') end
if redis.call('HINCRBY', KEYS[1], 'client:' .. client, -size) <= 0 then
  redis.call('HDEL', KEYS[1], 'client:' .. client)
end
return size
"""


class StorageFull(Exception):
    """No room for this batch: `scope` is "all" or "client"; `retry_after` seconds until some frees."""

    def __init__(self, scope: str, retry_after: int) -> None:
        super().__init__(scope)
        self.scope = scope
        self.retry_after = retry_after


class BatchStorage:
    """Reserves a batch's bytes at creation (or refuses it) and gives them back when it is deleted."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    @property
    def key(self) -> str:
        return redis_store.key(self.settings, "batches", "storage")

    def reserve(self, batch_id: str, client: str, size: int, oldest: Callable[[], float | None]) -> None:
        """Reserve `size` bytes for a new batch of `client`; StorageFull when a cap would be passed.

        `oldest()`: when the oldest batch still kept was created (asked only on a refusal), so
        Retry-After says when cleanup frees its room (at most a day away).
        """
        settings = self.settings
        refused = self._reserve(
            keys=[self.key],
            args=[
                batch_id,
                client,
                size,
                settings.batch_storage_max_bytes,
                settings.batch_storage_per_client_bytes,
            ],
        )
        if refused:
            frees_at = (oldest() or time.time()) + settings.batch_retention + settings.cleanup_interval
            retry_after = int(min(86_400, max(60, frees_at - time.time())))
            raise StorageFull("all" if refused == 1 else "client", retry_after)

    def release(self, batch_id: str) -> int:
        """Give a deleted batch's bytes back; returns them (0 when it had no reservation)."""
        return int(self._release(keys=[self.key], args=[batch_id]))

    def used(self) -> dict[str, int]:
        """Bytes reserved: `all`, and per client address."""
        entries = self.redis.hgetall(self.key).items()
        return {key.decode(): int(value) for key, value in entries if not key.startswith(b"batch:")}
