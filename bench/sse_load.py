"""The load side of bench/streams.py: an asyncio Server-Sent Events client holding many streams.

Runs as its own process (`python -m bench.sse_load`) so that the load it puts on the server
and the latency it measures are not mixed with the benchmark's publisher.  It reads one JSON
command per line on stdin and answers each with one JSON line on stdout:

    {"op": "open", "streams": [{"key", "url", "last_event_id"?}], "wait": "event"|"sent"}
    {"op": "count"}                        events received so far (all streams)
    {"op": "wait", "keys", "count", "timeout"}
    {"op": "collect", "keys"?}             every data event received: [seq, id, latency_s, type]
    {"op": "close", "keys"?}
    {"op": "probe", "streams", "timeout"}  how many got their response headers in time
    {"op": "trials", "trials": [{"key", "url", "start_at"}], "window"}
    {"op": "exit"}

HTTP/1.1 over raw asyncio streams (chunked bodies included) and the SSE spec's `event:`,
`data:` and `id:` fields; a data event is one whose JSON data carries the publisher's `seq`
and `sent` (time.time() at publish), which gives its publish-to-receive latency.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

OPEN_TIMEOUT = 60.0


@dataclass(eq=False)
class SseStream:
    """One open event stream and what it received."""

    key: str
    url: str
    last_event_id: str | None = None
    status: int | None = None
    error: str | None = None
    headers_at: float | None = None
    snapshot_at: float | None = None
    events: list = field(default_factory=list)  # [seq, id, latency seconds, type, received at]
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task | None = None
    headers: asyncio.Event = field(default_factory=asyncio.Event)
    first_event: asyncio.Event = field(default_factory=asyncio.Event)
    sent: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        try:
            await self._run()
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            self.error = self.error or f"{type(error).__name__}: {error}"
        finally:
            self.ended.set()
            self.first_event.set()  # wake waiters; they check `error`
            self.headers.set()
            self.sent.set()
            if self.writer is not None:
                self.writer.close()

    async def _run(self) -> None:
        parts = urlsplit(self.url)
        reader, self.writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
        ]
        if self.last_event_id:
            lines.append(f"Last-Event-ID: {self.last_event_id}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        self.sent.set()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("closed before the status line")
        self.status = int(status_line.split()[1])
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        self.headers_at = time.time()
        self.headers.set()
        if self.status != 200:
            self.error = f"HTTP {self.status}"
            return
        parser = SseParser(self._dispatch)
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    return
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                chunk = (await reader.readexactly(size + 2))[:-2]
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    return
            parser.feed(chunk)

    def _dispatch(self, event_type: str, data: str, event_id: str | None) -> None:
        now = time.time()
        if event_type == "snapshot":
            self.snapshot_at = now
        else:
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            if isinstance(body, dict) and "seq" in body and "sent" in body:
                self.events.append([body["seq"], event_id, now - body["sent"], event_type, now])
        self.first_event.set()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


class SseParser:
    """Incremental SSE parser: bytes in, (type, data, id) per dispatched event out."""

    def __init__(self, on_event) -> None:
        self.on_event = on_event
        self.buffer = b""
        self.event_type, self.data, self.event_id = "message", [], None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode()
            if line == "":
                if self.data:
                    self.on_event(self.event_type, "\n".join(self.data), self.event_id)
                self.event_type, self.data, self.event_id = "message", [], None
                continue
            if line.startswith(":"):
                continue  # a comment: heartbeat
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self.event_type = value
            elif name == "data":
                self.data.append(value)
            elif name == "id":
                self.event_id = value


class LoadClient:
    """The streams this process holds, by key, and the commands that drive them."""

    def __init__(self) -> None:
        self.streams: dict[str, SseStream] = {}

    def _start(self, spec: dict) -> SseStream:
        stream = SseStream(spec["key"], spec["url"], spec.get("last_event_id"))
        stream.task = asyncio.ensure_future(stream.run())
        self.streams[stream.key] = stream
        return stream

    def _select(self, keys: list[str] | None) -> list[SseStream]:
        if keys is None:
            return list(self.streams.values())
        return [self.streams[key] for key in keys if key in self.streams]

    async def op_open(self, streams: list[dict], wait: str = "event", concurrency: int = 200) -> dict:
        """Open streams, at most `concurrency` handshakes at a time; wait for each one's first
        event (our snapshot) or only until its request is sent (flask-sse sends nothing before
        the first published event)."""
        gate = asyncio.Semaphore(concurrency)
        started = time.monotonic()

        async def one(spec: dict) -> None:
            async with gate:
                stream = self._start(spec)
                signal = stream.first_event if wait == "event" else stream.sent
                try:
                    await asyncio.wait_for(signal.wait(), OPEN_TIMEOUT)
                except TimeoutError:
                    stream.error = stream.error or "timeout"

        await asyncio.gather(*(one(spec) for spec in streams))
        opened = [self.streams[spec["key"]] for spec in streams]
        errors: dict[str, int] = {}
        for stream in opened:
            if stream.error:
                errors[stream.error] = errors.get(stream.error, 0) + 1
        return {
            "ok": sum(1 for s in opened if not s.error),
            "failed": sum(1 for s in opened if s.error),
            "errors": errors,
            "seconds": time.monotonic() - started,
        }

    async def op_count(self) -> dict:
        return {
            "events": sum(len(s.events) for s in self.streams.values()),
            "ended": sum(1 for s in self.streams.values() if s.ended.is_set()),
        }

    async def op_wait(self, keys: list[str] | None = None, count: int = 1, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        streams = self._select(keys)
        while time.monotonic() < deadline and any(len(s.events) < count for s in streams):
            await asyncio.sleep(0.01)
        return {"counts": {s.key: len(s.events) for s in streams}}

    async def op_collect(self, keys: list[str] | None = None) -> dict:
        return {
            "streams": {
                s.key: {"events": s.events, "status": s.status, "error": s.error} for s in self._select(keys)
            }
        }

    async def op_close(self, keys: list[str] | None = None) -> dict:
        streams = self._select(keys)
        for stream in streams:
            stream.close()
            self.streams.pop(stream.key, None)
        await asyncio.sleep(0)
        return {"closed": len(streams)}

    async def op_probe(self, streams: list[dict], timeout: float = 5.0) -> dict:
        """Open extra streams at once; count those whose response headers arrive within `timeout`."""
        started = time.time()
        opened = [self._start(spec) for spec in streams]
        await asyncio.wait([asyncio.ensure_future(s.headers.wait()) for s in opened], timeout=timeout)
        answered = [s for s in opened if s.headers_at is not None and s.headers_at - started <= timeout]
        statuses: dict[str, int] = {}
        for stream in answered:
            statuses[str(stream.status)] = statuses.get(str(stream.status), 0) + 1
        await self.op_close([s.key for s in opened])
        return {"answered": len(answered), "tried": len(opened), "statuses": statuses}

    async def op_trials(self, trials: list[dict], window: float = 1.5) -> dict:
        """Each trial connects at its `start_at` (epoch seconds) and listens for `window` seconds."""

        async def one(spec: dict) -> tuple[str, list]:
            await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
            stream = self._start(spec)
            await asyncio.sleep(window)
            await self.op_close([stream.key])
            return spec["key"], [[e[0], e[1]] for e in stream.events]

        results = await asyncio.gather(*(one(spec) for spec in trials))
        return {"received": dict(results)}


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    client = LoadClient()
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            answer = await getattr(client, f"op_{op}")(**command)
        except Exception as error:  # noqa: BLE001 - report any failure to the driver, keep serving
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    await client.op_close()


if __name__ == "__main__":
    asyncio.run(main())
