"""The floor of a cached answer: the least a cached `POST /api/lookups` must do, in the service's stack.

bench/cached_lookup.py serves this with the launcher's web command (gunicorn, `-c gunicorn_config.py`,
gevent, WEB_WORKERS workers, the same options) in place of `app:create_app()`, and measures it in
the same run as the service.  Its POST handler parses the JSON body, reads pre-encoded bytes from a
dict by the body's identifier, and returns them with the headers of a real cached answer: same
names, same values, so the same size on the wire.  No validation, no cache read, no Redis, no lookup
record, no metrics, no log line: what the service reaches against this is what its own work costs
on top of Flask and gunicorn.

FLOOR_ANSWER names a JSON file of one real cached answer, as the service sent it:
`{"identifier": "...", "headers": [[name, value], ...], "body": "..."}` (the headers without the
ones gunicorn adds itself: Date, Server, Connection, Content-Length, Transfer-Encoding).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import orjson
from flask import Flask, Response, request


def create_app() -> Flask:
    answer = json.loads(Path(os.environ["FLOOR_ANSWER"]).read_text())
    answers = {answer["identifier"]: answer["body"].encode()}  # pre-encoded, read once per request
    headers = [tuple(pair) for pair in answer["headers"]]
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', 200, content_type="application/json")

    @app.post("/api/lookups")
    def lookup() -> Response:
        return Response(answers[orjson.loads(request.get_data())["identifier"]], 200, headers)

    return app
