"""What logs must never show: secrets (admin token, Redis passwords, auth headers) and whole CPFs."""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

from enrich.settings import Settings

REDACTED = "***"
# The shortest ADMIN_TOKEN replaced wherever it appears (a shorter one would blank out common words).
MIN_SECRET_LENGTH = 4


def mask_identifier(kind: str, value: str) -> str:
    """An identifier as logs show it: a CPF (a person's) keeps its first 3 and last 2 digits only.

    CNPJs and CEPs name companies and streets, public registry data, and stay readable.
    """
    if kind != "cpf" or len(value) <= 5:
        return value
    return value[:3] + "*" * (len(value) - 5) + value[-2:]


# -- redaction -----------------------------------------------------------------------------

_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:@/\s'\"]*):([^@/\s'\"]+)@")
_SECRET_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization|set-cookie|cookie|x-admin-token)(['\"]?\s*[:=]\s*['\"]?)([^'\"\r\n]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
# A CPF wherever it shows (a task's arguments in Celery's own lines): 11 digits standing alone, or
# 111.444.777-35; ids (base64url, hex) never match, their digits touch letters, - or _.
_CPF = re.compile(r"(?<![\w.-])(\d{3})(\.?\d{3}\.?\d{3}-?)(\d{2})(?![\w-])")


class Redactor:
    """Replaces secrets with ***: known values (the admin token, Redis passwords), URL passwords,
    Authorization / Cookie header values and bearer tokens."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def learn(self, settings: Settings) -> None:
        """Remember this configuration's secrets (kept for good: tests build apps with many tokens)."""
        found = [settings.admin_token]
        for url in (settings.redis_url, settings.effective_redis_url):
            with contextlib.suppress(ValueError):
                password = urlsplit(url).password
                found += [password, unquote(password)] if password else []
        with self._lock:
            self._secrets.update(s for s in found if s and len(s) >= MIN_SECRET_LENGTH)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for secret in sorted(self._secrets, key=len, reverse=True):  # a longer secret may contain another
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
        text = _SECRET_HEADER.sub(rf"\1\2{REDACTED}", text)
        text = _BEARER.sub(rf"\1 {REDACTED}", text)
        return _CPF.sub(_mask_cpf, text)


def _mask_cpf(match: re.Match) -> str:
    return match[1] + re.sub(r"\d", "*", match[2]) + match[3]


redact = Redactor()


def redact_values(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(item) for item in value]
    return value
