"""Bytes a batch keeps in Redis per input line, as Redis counts them and as batch_storage reserves them.

Not a load benchmark (it is not in `make bench`): a measurement for the README's batch storage caps.
It starts a private embedded Valkey, creates 10,000-row batches of three kinds in process (no worker:
the items stay queued, as a big batch's mostly are) and reads `MEMORY USAGE` of each batch's keys.

    .venv/bin/python -m bench.batch_bytes
"""

from __future__ import annotations

import sys
import tempfile

from app import close_app, create_app
from devstack.embedded_redis import EmbeddedRedis, free_port
from enrich.batches import input as batch_input
from enrich.services import services
from enrich.settings import Settings

ROWS = 10_000


def kinds() -> dict[str, list[str]]:
    """10,000 rows of each kind: distinct CEPs (queued), 413-character junk (invalid), one CEP repeated."""
    return {
        "distinct CEPs (queued)": [f"{10_000_000 + n:08d}" for n in range(ROWS)],
        "413-character junk (invalid)": ["x" * 413 + str(n) for n in range(ROWS)],
        "one CEP repeated (duplicates)": ["01310-100"] * ROWS,
    }


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(free_port(), tmp, appendonly=False)
        server.start()
        settings = Settings.from_env({}, redis_url=server.url, key_prefix="bytes", batch_rate_limit="off")
        app = create_app(settings)
        try:
            batches, client = services(app).batches, services(app).redis
            print(f"{'rows':<32} {'Redis bytes/row':>16} {'reserved bytes/row':>19}")
            for kind, rows in kinds().items():
                with app.app_context():
                    batch_id = batches.create(batch_input.parse_json(rows, ROWS), kind)["id"]
                keys = [batches.key(batch_id, part) for part in (None, "lines", "queue", "items", "running")]
                used = sum(client.memory_usage(key, samples=0) or 0 for key in keys)
                reserved = int(batches.storage.used()["client:cli"])
                batches.storage.release(batch_id)
                print(f"{kind:<32} {used / ROWS:>16.1f} {reserved / ROWS:>19.1f}")
        finally:
            close_app(app)
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
