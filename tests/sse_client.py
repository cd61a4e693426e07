"""A small Server-Sent Events reader over requests, for tests: events with their ids, and comments.

Test-side only.  Libraries such as sseclient-py hide comment lines, and the tests need to see
the heartbeats, so the parsing (the SSE spec's four fields) is done here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import requests


@dataclass(frozen=True)
class Event:
    type: str
    data: str
    id: str | None
    retry: int | None = None

    @property
    def json(self) -> dict:
        return orjson.loads(self.data)


@dataclass(frozen=True)
class Comment:
    text: str


def parse(lines: Iterator[str]) -> Iterator[Event | Comment]:
    """SSE records from decoded lines (without line endings)."""
    event_type, data, event_id, retry = "message", [], None, None
    for line in lines:
        if line == "":
            if data:
                yield Event(event_type, "\n".join(data), event_id, retry)
            event_type, data, event_id, retry = "message", [], None, None
            continue
        if line.startswith(":"):
            yield Comment(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)


class Stream:
    """One open event stream; records arrive on a background thread into `records`."""

    def __init__(self, url: str, last_event_id: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.response = requests.get(url, headers=headers, stream=True, timeout=timeout)
        self.records: queue.Queue = queue.Queue()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for record in parse(self.response.iter_lines(decode_unicode=True)):
                self.records.put(record)
        except (requests.RequestException, AttributeError, ValueError):
            pass  # closed by the test
        finally:
            self.ended.set()

    def next_event(self, timeout: float = 10.0) -> Event:
        """The next event, skipping comments."""
        while True:
            record = self.records.get(timeout=timeout)
            if isinstance(record, Event):
                return record

    def until(self, event_type: str, timeout: float = 20.0) -> list[Event]:
        """Events up to and including the first of `event_type`."""
        events = []
        while True:
            events.append(self.next_event(timeout))
            if events[-1].type == event_type:
                return events

    def close(self) -> None:
        self.response.close()


def read_all(url: str, last_event_id: str | None = None, timeout: float = 30.0) -> list[Event | Comment]:
    """Every record of a stream that ends by itself (after `complete` or `error`)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        return list(parse(response.iter_lines(decode_unicode=True)))
