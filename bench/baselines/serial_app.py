"""The seeds' "before" design: one synchronous endpoint that calls the same sources one after another.

`POST /api/lookups` `{"identifier"}` validates like the service, then fetches each source in turn
with the project's own adapters (same sandbox, same timeouts), merges and answers with the
result; no cache, no queue, no breaker.  Served by gunicorn's default sync workers, 2 x cores + 1:

    gunicorn -w 5 -b 127.0.0.1:PORT "bench.baselines.serial_app:create_app()"
"""

from __future__ import annotations

import time

import orjson
from flask import Flask, Response, request

from enrich import cross_checks
from enrich.identifiers import InvalidIdentifier, parse
from enrich.lookups import SourceResult, SourceState
from enrich.settings import Settings
from enrich.sources import NotFound, SourceError, build_sources, sources_for


def create_app() -> Flask:
    settings = Settings.from_env()
    sources = build_sources(settings)
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", 200, content_type="text/plain")

    @app.post("/api/lookups")
    def lookup() -> Response:
        try:
            identifier = parse((request.get_json(silent=True) or {}).get("identifier", ""), None)
        except InvalidIdentifier as error:
            return Response(
                orjson.dumps({"error": "invalid_identifier", "message": error.message}),
                400,
                mimetype="application/json",
            )
        results = {}
        for source in sources_for(str(identifier.type), sources):
            if not source.supports(identifier):
                continue
            started = time.perf_counter()
            try:
                data, state, error_text = source.fetch(identifier), SourceState.OK, None
            except NotFound as error:
                data, state, error_text = None, SourceState.NOT_FOUND, error.message
            except SourceError as error:
                data, state, error_text = None, SourceState.ERROR, error.message
            elapsed = round((time.perf_counter() - started) * 1000, 1)
            results[source.name] = SourceResult(
                source.name, state, data=data, elapsed_ms=elapsed, error=error_text
            )
        body = {
            "identifier": identifier.value,
            "type": str(identifier.type),
            "status": "complete",
            "sources": {name: result.to_dict() for name, result in results.items()},
            "result": cross_checks.merge(str(identifier.type), results),
        }
        return Response(orjson.dumps(body), 200, mimetype="application/json")

    return app
