"""Dead-letter list: source calls that failed after every retry, kept with their error for requeue
(pipeline.requeue_dead_letter sends one again)."""

from __future__ import annotations

import secrets
import time

import orjson
import redis

from enrich import metrics, redis_store
from enrich.settings import Settings


class DeadLetters:
    """A capped list of failed calls (newest first) and one record per entry."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.list_key = redis_store.key(settings, "deadletters")

    def _entry_key(self, entry_id: str) -> str:
        return redis_store.key(self.settings, "deadletter", entry_id)

    def add(
        self,
        lookup_id: str,
        source: str,
        identifier_type: str,
        identifier: str,
        priority: int,
        error: str,
        attempts: int,
    ) -> str:
        """Record a call that exhausted its retries; returns the entry id."""
        entry_id = secrets.token_hex(8)
        entry = {
            "id": entry_id,
            "lookup_id": lookup_id,
            "source": source,
            "type": identifier_type,
            "identifier": identifier,
            "priority": priority,
            "error": error,
            "attempts": attempts,
            "failed_at": time.time(),
            "requeued_at": None,
            "requeue_count": 0,
        }
        with self.redis.pipeline() as pipe:
            pipe.set(self._entry_key(entry_id), orjson.dumps(entry), ex=self.settings.lookup_record_ttl * 7)
            pipe.lpush(self.list_key, entry_id)
            pipe.ltrim(self.list_key, 0, self.settings.dead_letter_max - 1)
            pipe.execute()
        metrics.dead_letter_added(source)
        return entry_id

    def get(self, entry_id: str) -> dict | None:
        raw = self.redis.get(self._entry_key(entry_id))
        return orjson.loads(raw) if raw else None

    def list(self, limit: int = 100) -> list[dict]:
        """The newest `limit` entries."""
        ids = [i.decode() for i in self.redis.lrange(self.list_key, 0, limit - 1)]
        raws = self.redis.mget([self._entry_key(i) for i in ids]) if ids else []
        return [orjson.loads(raw) for raw in raws if raw]

    def count(self) -> int:
        return int(self.redis.llen(self.list_key))

    def mark_requeued(self, entry_id: str) -> dict | None:
        """Take an entry off the list for a new attempt; returns it (None if unknown)."""
        entry = self.get(entry_id)
        if entry is None:
            return None
        entry["requeued_at"] = time.time()
        entry["requeue_count"] += 1
        with self.redis.pipeline() as pipe:
            pipe.set(self._entry_key(entry_id), orjson.dumps(entry), keepttl=True)
            pipe.lrem(self.list_key, 0, entry_id)
            pipe.execute()
        return entry

    def prune(self) -> int:
        """Beat cleanup: drop list ids whose entry expired."""
        removed = 0
        for entry_id in [i.decode() for i in self.redis.lrange(self.list_key, 0, -1)]:
            if not self.redis.exists(self._entry_key(entry_id)):
                removed += self.redis.lrem(self.list_key, 0, entry_id)
        return removed
