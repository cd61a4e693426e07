"""JSON as the service writes it, for stores and responses alike: orjson, with markup characters escaped."""

from __future__ import annotations

import orjson


def encode_json(body: object) -> bytes:
    """orjson-encoded JSON with `<`, `>` and `&` escaped, so no echoed input is ever live markup."""
    data = orjson.dumps(body)
    if b"<" in data or b">" in data or b"&" in data:
        data = data.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
    return data
