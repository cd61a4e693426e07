"""Ids of lookups answered whole from the cache: sealed tokens, so that such an answer writes nothing to Redis.

A lookup answered from the cache never changes, and everything it holds beyond its shared body
(sources, result, checks: `answer:{digest}`, written once per process and body, see
LookupStore.create_answered) is its creation time and priority.  Its id carries those and the
body's digest, sealed with AES-GCM under a key of the cluster's: `GET /api/lookups/<id>` and its
event stream open the id and read the body, so no per-lookup record is stored.

What an id reveals: nothing.  Each is encrypted under a fresh random 96-bit nonce, so two ids for
the same company look unrelated and a forged or altered id does not open (404).  The id is as
much the asker's own as a random record id: only the server's key opens it.

The key: 32 random bytes under `{prefix}:secret:answer-ids` (no TTL, one of the keys the README
lists as kept), created by the first process that needs it (SET NX) and read by every other, so
web processes on any machine open each other's ids without a setting.  A Redis that lost it (a
flush, a restart without persistence) lost the answer bodies too: a process notices when a body
it shares has gone (LookupStore's presence check) or when an id does not open, and reads the key
again (at most once a RELOAD_INTERVAL), so the cluster agrees on the new key within about a second.

AES-GCM from `cryptography` (not a hand-made MAC or cipher): a standard AEAD, about 2 us a seal.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from dataclasses import dataclass

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enrich import redis_store
from enrich.settings import Settings

VERSION = b"\x01"  # the first byte of every id: its format (base64 "A" first, never "-")
NONCE_BYTES = 12
DIGEST_BYTES = 16
_SEALED = 6 + 1 + DIGEST_BYTES  # created_at in ms, priority, body digest
_TAG_BYTES = 16
ID_BYTES = len(VERSION) + NONCE_BYTES + _SEALED + _TAG_BYTES
ID_LENGTH = (ID_BYTES * 8 + 5) // 6  # unpadded URL-safe base64: 70 characters
RELOAD_INTERVAL = 1.0  # seconds between two reads of the key after an id did not open


@dataclass(frozen=True)
class AnswerRef:
    """What an opened id names: the shared body's digest, and the lookup's own creation time and priority."""

    digest: bytes
    created_at: float
    priority: int


def looks_like_answer_id(lookup_id: str) -> bool:
    """True for an id this module issues (a record id is 22 characters; no Redis read)."""
    return len(lookup_id) == ID_LENGTH and lookup_id[0] == "A"


class AnswerIds:
    """Seals and opens answer ids with the cluster's key (read from Redis on first use)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.key_name = redis_store.key(settings, "secret", "answer-ids")
        self._aead: AESGCM | None = None
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")

    def _cipher(self) -> AESGCM:
        aead = self._aead
        if aead is None:
            aead = self.reload()
        return aead

    def reload(self) -> AESGCM:
        """Read the key from Redis, creating it if no process has yet (raises RedisError)."""
        with self._lock:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.key_name, os.urandom(32), nx=True)
                pipe.get(self.key_name)
                key = pipe.execute()[1]
            self._aead = AESGCM(key)
            self._loaded_at = time.monotonic()
            return self._aead

    def issue(self, digest: bytes, created_at: float, priority: int) -> str:
        """A new id naming the body `digest` for a lookup created at `created_at` (ms kept)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = round(created_at * 1000).to_bytes(6, "big") + bytes((priority,)) + digest
        token = VERSION + nonce + self._cipher().encrypt(nonce, sealed, VERSION)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode()

    def open(self, lookup_id: str) -> AnswerRef | None:
        """What the id names, or None if it is not one of ours (malformed, altered, another key's)."""
        if not looks_like_answer_id(lookup_id):
            return None
        try:
            token = base64.urlsafe_b64decode(lookup_id + "==")
        except (binascii.Error, ValueError):
            return None
        if len(token) != ID_BYTES or token[:1] != VERSION:
            return None
        nonce, sealed = token[1 : 1 + NONCE_BYTES], token[1 + NONCE_BYTES :]
        plain = self._open(nonce, sealed)
        if plain is None and time.monotonic() - self._loaded_at >= RELOAD_INTERVAL:
            self.reload()  # the key may have been made anew (a flushed Redis) by another process
            plain = self._open(nonce, sealed)
        if plain is None:
            return None
        created_ms, priority, digest = int.from_bytes(plain[:6], "big"), plain[6], plain[7:]
        return AnswerRef(digest=digest, created_at=created_ms / 1000, priority=priority)

    def _open(self, nonce: bytes, sealed: bytes) -> bytes | None:
        try:
            return self._cipher().decrypt(nonce, sealed, VERSION)
        except InvalidTag:
            return None
