"""wrk (Debian's package `wrk`, a C load generator) run at full speed, its summary as a dict.

A closed loop: `connections` keep-alive connections on one thread (`wrk -t1 -cC -dNs`), each
sending its next request as soon as the previous answer is in, for `seconds`.  Being C, wrk
spends far less CPU per request than bench/http_load.py, so on a machine whose cores it shares
with the server the figure depends much less on the load generator.  It cannot pace requests at
a fixed rate: fixed-rate runs stay with bench/http_load.py.

    from bench import wrk
    wrk.run("http://127.0.0.1:8000/healthz", seconds=8)
    wrk.run(url, seconds=8, connections=32, method="POST", body='{"identifier": "..."}',
            headers={"Content-Type": "application/json"})

The method, body and headers go in a Lua script written to `tmp` (`wrk.method`, `wrk.body`,
`wrk.headers`; wrk adds Content-Length).  The same script's `done(summary, latency, requests)`
prints one JSON line of wrk's own summary, which is parsed here: no Lua runs per request.
`statuses=True` adds a `response()` hook that counts every answer's status; wrk then hands every
response's headers and body to Lua, which costs throughput, so runs whose throughput is the
figure leave it off and read `answers_4xx_5xx` instead.

The figures (`run`'s dict):

- `requests`: answers wrk read completely (whatever their status); requests still in flight
  when the time is up are not counted.  `seconds`: wrk's own measured duration; `rps`: the two
  divided.
- `p50_ms`, `p99_ms`, `mean_ms`: wrk's latency figures, from sending a request to reading its whole
  answer, AFTER wrk's coordinated-omission correction: before the summary (and `done`) wrk takes
  the average time per request of one connection (duration / (requests / connections)) and, for
  every answer that took at least twice that, adds synthetic samples at its latency minus 1, 2, ...
  times that interval (the requests a steady client would have sent meanwhile).  With stalls these
  percentiles are well above the per-request ones (one 1 s stall at a 16 ms interval adds ~60
  samples), and `mean_ms` can exceed what the throughput allows.  `max_ms` is a real answer's.
- `cycle_ms`: connections x seconds / requests, each connection's average time per request
  (Little's law, no correction): per-request latency plus wrk's own turnaround.
- `answers_4xx_5xx`: answers with a status of 400 or more (what wrk prints as "Non-2xx or 3xx
  responses": a 202 or a 3xx is NOT counted, and neither is a 200 with the wrong body).
- `socket_errors`: wrk's `connect`, `read`, `write` and `timeout` counts (a timeout is an answer
  that took longer than `timeout` seconds); `socket_errors_total` their sum.  A server that closes
  the connection after an answer (no keep-alive) shows as one `read` error per answer: wrk then
  reconnects, and the answer itself is still counted.
- `statuses`: `{"200": n, "429": n, ...}` with `statuses=True`, else None.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

MARKER = "WRK_SUMMARY_JSON "


class WrkMissing(RuntimeError):
    """wrk is not installed."""


def lua_string(text: str) -> str:
    """A Lua string literal of `text` (every byte outside a safe set as a three-digit decimal escape)."""
    safe = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:/{}[]")
    return '"' + "".join(chr(byte) if byte in safe else f"\\{byte:03d}" for byte in text.encode()) + '"'


def script(
    method: str = "GET", body: str | None = None, headers: dict | None = None, statuses: bool = False
) -> str:
    """The Lua script of one run: the request, and a `done` that prints the summary as one JSON line."""
    lines = [f"wrk.method = {lua_string(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {lua_string(body)}")
    for name, value in (headers or {}).items():
        lines.append(f"wrk.headers[{lua_string(name)}] = {lua_string(value)}")
    if statuses:
        # Each thread counts in its own Lua state; done() (in the main state) gathers the counts.
        lines += [
            "local threads = {}",
            "function setup(thread) table.insert(threads, thread) end",
            "statuses = {}",
            "function response(status, headers, body)",
            "  statuses[status] = (statuses[status] or 0) + 1",
            "end",
        ]
    lines += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        "  local parts = {",
        '    string.format(\'"requests":%d,"duration_us":%d,"bytes":%d\',',
        "      summary.requests, summary.duration, summary.bytes),",
        '    string.format(\'"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d\',',
        "      e.connect, e.read, e.write, e.status, e.timeout),",
        '    string.format(\'"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.3f\',',
        "      latency:percentile(50), latency:percentile(99), latency.max, latency.mean),",
        "  }",
    ]
    if statuses:
        lines += [
            "  local counts = {}",
            "  for _, thread in ipairs(threads) do",
            '    for status, count in pairs(thread:get("statuses")) do',
            "      counts[#counts + 1] = string.format('\"%d\":%d', status, count)",
            "    end",
            "  end",
            "  parts[#parts + 1] = '\"statuses\":[{' .. table.concat(counts, '},{') .. '}]'",
        ]
    lines += [
        f"  io.write({lua_string(MARKER)} .. '{{' .. table.concat(parts, ',') .. '}}\\n')",
        "end",
    ]
    return "\n".join(lines) + "\n"


def run(
    url: str,
    seconds: int,
    connections: int = 32,
    *,
    method: str = "GET",
    body: str | None = None,
    headers: dict | None = None,
    statuses: bool = False,
    timeout: float = 10.0,
    tmp: Path | None = None,
) -> dict:
    """Run `wrk -t1 -c<connections> -d<seconds>s` against `url`; returns its figures (module docstring).

    `seconds` is whole seconds (wrk takes no fraction); `timeout` is wrk's `--timeout`, also the
    top of its latency histogram (an answer slower than that is a `timeout` error and no sample;
    wrk's own default, 2 s, is within reach of a stall on a loaded machine); the Lua script is
    written to `tmp` (default: a temporary directory) and removed afterwards.
    """
    executable = shutil.which("wrk")
    if executable is None:
        raise WrkMissing("wrk is not installed (Debian's package `wrk`): run `make wrk`")
    if int(seconds) != seconds or seconds < 1:
        raise ValueError(f"wrk runs for whole seconds, at least 1 (asked for {seconds})")
    seconds = int(seconds)
    directory = Path(tmp) if tmp is not None else Path(tempfile.gettempdir())
    path = directory / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    path.write_text(script(method, body, headers, statuses))
    command = [
        executable,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        f"{max(1, round(timeout))}s",
        "-s",
        str(path),
        url,
    ]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        path.unlink(missing_ok=True)
    line = next((line for line in finished.stdout.splitlines() if line.startswith(MARKER)), None)
    if finished.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({finished.returncode}): {' '.join(command)}\n"
            f"{finished.stdout[-2000:]}\n{finished.stderr[-2000:]}"
        )
    return figures(json.loads(line[len(MARKER) :]), connections)


def figures(raw: dict, connections: int) -> dict:
    """`run`'s dict from the summary line that the script's `done` printed."""
    elapsed = raw["duration_us"] / 1e6
    socket_errors = {name: raw[name] for name in ("connect", "read", "write", "timeout")}
    counts = None
    if "statuses" in raw:
        counts = {}
        for entry in raw["statuses"]:
            for status, count in entry.items():
                counts[status] = counts.get(status, 0) + count
        counts = dict(sorted(counts.items()))
    return {
        "requests": raw["requests"],
        "seconds": round(elapsed, 3),
        "rps": round(raw["requests"] / elapsed, 2) if elapsed else 0.0,
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "max_ms": round(raw["max_us"] / 1000, 3),
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "cycle_ms": round(connections * elapsed * 1000 / raw["requests"], 3) if raw["requests"] else None,
        "bytes": raw["bytes"],
        "answers_4xx_5xx": raw["status"],
        "socket_errors": socket_errors,
        "socket_errors_total": sum(socket_errors.values()),
        "statuses": counts,
        "connections": connections,
        "threads": 1,
    }
