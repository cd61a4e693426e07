"""HTTP/1.1 load generator of the benchmarks: keep-alive connections over raw asyncio streams.

Runs as its own process on loopback, so the server under test never shares an interpreter with
its load, and prints one JSON summary on stdout.  The same generator drives every side of a
comparison (the service, healthz, the serial baseline).

    python -m bench.http_load URL --connections 32 --seconds 10                    # fixed concurrency (closed loop)
    python -m bench.http_load URL --connections 64 --seconds 10 --rate 500         # fixed rate (open loop)
    python -m bench.http_load URL --method POST --body '{"identifier": "..."}'     # one JSON body for every request
    python -m bench.http_load URL --method POST --bodies FILE --follow sse         # one body per line, each sent once

`--follow sse|poll` times a whole lookup: a 202 answer is followed to its end, over its event
stream (`links.events`, on a new connection, until `complete` or `error`) or by polling
`links.self` on the same connection; a 200 is already complete.  The serial baseline answers
only when it is done, so `--follow` changes nothing there.

At a fixed rate, request i is due at start + i / rate whatever happened before it; its latency
runs from that due time (no coordinated omission: a stalled server shows as latency, not as
fewer samples).  Latencies are kept as sorted samples, so the percentiles are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from urllib.parse import urlsplit

POLL_INTERVAL = 0.005
SSE_END = re.compile(rb"(?:^|\n)event: ?(?:complete|error)\r?\n")  # the spec's space is optional


class Failed(Exception):
    """A request that got no successful answer (an error status, a broken event stream)."""


class Closed(Exception):
    """The server closed the connection (a sync worker does after every answer)."""


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0

    async def open(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and read its whole answer; reconnects once if the connection went stale."""
        for attempt in (1, 2):
            if self.writer is None:
                await self.open()
            try:
                self.writer.write(_request(method, path, self.host, body))
                status, headers = await _head(self.reader)
                content = await _body(self.reader, headers)
            except (Closed, ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if headers.get(b"connection", b"").lower() == b"close":
                self.close()
            return status, content
        raise AssertionError("unreachable")


def _request(method: str, path: str, host: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        raise Closed from error
    lines = raw.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(lines[0][9:12]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    if b"content-length" in headers:
        return await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                return b"".join(parts)
    return await reader.read()  # until close


async def _follow_sse(host: str, port: int, path: str) -> None:
    """Read the lookup's event stream on a new connection until `complete` or `error`."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        status, headers = await _head(reader)
        if status != 200:
            raise Failed(f"event stream HTTP {status}")
        chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        seen = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    raise Failed("event stream ended before complete")
            else:
                data = await reader.read(65536)
                if not data:
                    raise Failed("event stream ended before complete")
            seen = seen[-64:] + data  # an event line split across reads still matches
            if SSE_END.search(seen):
                return
    finally:
        writer.close()


async def _follow_poll(connection: Connection, path: str) -> None:
    while True:
        await asyncio.sleep(POLL_INTERVAL)
        status, content = await connection.request("GET", path)
        if status == 200 and json.loads(content)["status"] == "complete":
            return
        if status != 200:
            raise Failed(f"polling HTTP {status}")


class Load:
    """Shared state of one run: the bodies, the schedule and every sample."""

    def __init__(self, arguments: argparse.Namespace) -> None:
        parts = urlsplit(arguments.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/"
        self.method = arguments.method
        self.follow = arguments.follow
        if arguments.bodies:
            with open(arguments.bodies, "rb") as lines:
                self.bodies = [line.rstrip(b"\n") for line in lines if line.strip()]
        else:
            self.bodies = None
        self.body = arguments.body.encode()
        self.limit = arguments.requests or (len(self.bodies) if self.bodies is not None else None)
        self.rate = arguments.rate
        self.timeout = arguments.timeout
        self.issued = 0
        self.latencies: list[float] = []
        self.trace: list[tuple[float, float, str | None]] = []  # (due after start, seconds, lookup id)
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.started = 0.0
        self.deadline = 0.0

    def next_slot(self) -> tuple[int, float] | None:
        """The next request's index and due time, or None when the run is over."""
        if self.limit is not None and self.issued >= self.limit:
            return None
        index = self.issued
        due = self.started + index / self.rate if self.rate else time.perf_counter()
        if due >= self.deadline:
            return None
        self.issued += 1
        return index, due

    async def one(self, connection: Connection, body: bytes) -> str | None:
        """One request, and with --follow the lookup it started, to its end; the lookup's id if followed."""
        status, content = await connection.request(self.method, self.path, body)
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if status >= 400:  # answered, but not a success: no latency sample
            raise Failed(f"HTTP {status}")
        if status == 202 and self.follow != "none":
            answer = json.loads(content)
            links = answer["links"]
            if self.follow == "sse":
                await _follow_sse(self.host, self.port, links["events"])
            else:
                await _follow_poll(connection, links["self"])
            return answer.get("id")
        return None

    async def worker(self) -> None:
        connection = Connection(self.host, self.port)
        try:
            while (slot := self.next_slot()) is not None:
                index, due = slot
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = self.bodies[index] if self.bodies is not None else self.body
                try:
                    lookup_id = await asyncio.wait_for(self.one(connection, body), self.timeout)
                except (
                    OSError,
                    Failed,
                    Closed,
                    asyncio.IncompleteReadError,
                    KeyError,
                    TimeoutError,
                ) as error:
                    if isinstance(error, TimeoutError):
                        connection.close()  # its answer may still come: never read it as the next one's
                    name = str(error) if isinstance(error, Failed) else type(error).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                    if len(self.error_samples) < 5:
                        self.error_samples.append(f"{name}: {error}")
                    continue
                self.latencies.append(time.perf_counter() - due)
                self.trace.append((due - self.started, self.latencies[-1], lookup_id))
        finally:
            connection.close()

    async def run(self, connections: int, seconds: float) -> dict:
        self.started = time.perf_counter()
        self.deadline = self.started + seconds
        await asyncio.gather(*(self.worker() for _ in range(connections)))
        elapsed = time.perf_counter() - self.started
        ordered = sorted(self.latencies)
        return {
            "requests": len(ordered),  # successful ones; the rest are in errors
            "failed": sum(self.errors.values()),
            "errors": self.errors,
            "error_samples": self.error_samples,
            "statuses": dict(sorted(self.statuses.items())),
            "seconds": round(elapsed, 3),
            "rps": round(len(ordered) / elapsed, 2) if elapsed else 0.0,
            "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3) if ordered else 0.0,
            **{f"p{label}_ms": percentile(ordered, share) for label, share in PERCENTILES},
            "max_ms": round(ordered[-1] * 1000, 3) if ordered else 0.0,
            "connections": connections,
            "rate": self.rate,
            "follow": self.follow,
        }


PERCENTILES = (("50", 0.50), ("90", 0.90), ("95", 0.95), ("99", 0.99), ("999", 0.999))


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted seconds, in milliseconds."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, int(share * len(ordered) + 0.999999) - 1))
    return round(ordered[rank] * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="", help="JSON body sent with every request")
    parser.add_argument("--bodies", help="file of JSON bodies, one a line, each sent once in order")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="stop issuing requests after this")
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument("--rate", type=float, help="requests per second in all (open loop)")
    parser.add_argument("--follow", choices=("none", "sse", "poll"), default="none")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (and its follow)")
    parser.add_argument(
        "--samples", action="store_true", help="add every latency (ms, sorted) to the summary"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="add every request as [s after the start it was due, ms, lookup id] in due order",
    )
    arguments = parser.parse_args()
    load = Load(arguments)
    summary = asyncio.run(load.run(arguments.connections, arguments.seconds))
    if arguments.samples:
        summary["samples_ms"] = [round(value * 1000, 3) for value in sorted(load.latencies)]
    if arguments.trace:
        summary["trace"] = [
            [round(at, 3), round(seconds * 1000, 3), lookup] for at, seconds, lookup in sorted(load.trace)
        ]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
