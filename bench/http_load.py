"""HTTP/1.1 load generator for the benchmarks: keep-alive connections on raw asyncio streams.

Run as its own process on loopback, so the server under test never shares an interpreter with
its load; prints one JSON summary on stdout.  Two modes:

    http_load.py URL --connections 32 --seconds 10                 # closed loop: as fast as it goes
    http_load.py URL --connections 32 --seconds 10 --rate 500      # open loop: 500 requests/s in all

Hand-written rather than wrk (not on a fresh machine) or an HTTP library: it needs nothing but
the standard library and measures each request from its send to the last byte of its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


def _request(method: str, path: str, host: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _answer(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length bodies only, as the service sends); returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _connection(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    interval: float | None,
    start: float,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    next_at = start
    try:
        while True:
            if interval is not None:  # open loop: each connection keeps its own share of the rate
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                return
            sent = time.perf_counter()
            writer.write(request)
            status = await _answer(reader)
            latencies.append(time.perf_counter() - sent)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


def _percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else 0.0


async def run(
    url: str, method: str, body: bytes, connections: int, seconds: float, rate: float | None
) -> dict:
    parts = urlsplit(url)
    request = _request(method, parts.path or "/", parts.netloc, body)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    interval = connections / rate if rate else None
    await asyncio.gather(
        *(
            _connection(
                parts.hostname,
                parts.port or 80,
                request,
                start + seconds,
                interval,
                start + (interval or 0) * n / connections,
                latencies,
                statuses,
            )
            for n in range(connections)
        )
    )
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "seconds": round(elapsed, 3),
        "rps": round(len(ordered) / elapsed, 1),
        "p50_ms": round(_percentile(ordered, 0.50), 2),
        "p95_ms": round(_percentile(ordered, 0.95), 2),
        "p99_ms": round(_percentile(ordered, 0.99), 2),
        "max_ms": round(_percentile(ordered, 1.0), 2),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "connections": connections,
        "rate": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="", help="JSON body sent with every request")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--rate", type=float, help="requests per second in all (open loop); default: closed loop"
    )
    arguments = parser.parse_args()
    summary = asyncio.run(
        run(
            arguments.url,
            arguments.method,
            arguments.body.encode(),
            arguments.connections,
            arguments.seconds,
            arguments.rate,
        )
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
