"""The baseline: flask-sse 1.0.0 wired exactly as its README shows, plus a /healthz for start-up.

Served by bench/streams.py with `gunicorn -k gevent -w 1` and gunicorn's defaults otherwise
(worker_connections = 1000).  Streams are `GET /stream?channel=<name>`; the benchmark publishes
with `sse.publish(data, type=..., id=..., channel=...)` inside this app's context, from its own
process, as a Celery task of a flask-sse app would.
"""

from __future__ import annotations

import os

from flask import Flask
from flask_sse import sse


def create_app() -> Flask:
    """The README's app: REDIS_URL in the config and the blueprint under /stream."""
    app = Flask(__name__)
    app.config["REDIS_URL"] = os.environ.get("REDIS_URL", "redis://localhost")
    app.register_blueprint(sse, url_prefix="/stream")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
