"""The bulk batch API: `POST /api/batches`, its status, events, cancel and streamed results.

The routes only read the request and shape the answer: batches/input.py reads what was uploaded,
the batch store (batches/store.py) keeps the batch and the runner (batches/runner.py) moves it
along.  The links a batch's status shows are built here (`batch_links`); the runner is handed this
function to put them in the statuses it publishes.  Reading a batch's status (its JSON, its event
stream) also repairs a batch whose steps stopped (`BatchRunner.kick_if_stalled`), as the README
says; the store's own reads never send anything.  A batch's id is meant to be shared (its page,
events and results need nothing else); cancelling it takes the `cancel_token` its creation
returned, sent back in the `X-Cancel-Token` header.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request, stream_with_context

from enrich.api_errors import ApiError, json_response
from enrich.batches import input as batch_input
from enrich.batches.rows import csv_lines, jsonl_lines
from enrich.batches.runner import BatchRunner
from enrich.batches.storage import StorageFull
from enrich.batches.store import BatchStore
from enrich.services import services
from sse_streaming import sse  # the blueprint that owns the event streams

batch_api = Blueprint("batch_api", __name__)
CREATE_ENDPOINT = "batch_api.create_batch"  # POST /api/batches: BATCH_MAX_BYTES, not MAX_REQUEST_BYTES


def batch_body_limit() -> None:
    """A batch's body may be BATCH_MAX_BYTES, not MAX_REQUEST_BYTES: set before anything reads it
    (an app hook, registered ahead of app.whole_body_or_413)."""
    if request.endpoint == CREATE_ENDPOINT:
        request.max_content_length = services().settings.batch_max_bytes


log = logging.getLogger("api")

CSV_TYPES = ("text/csv", "text/plain", "application/csv", "application/vnd.ms-excel")
CANCEL_TOKEN_HEADER = "X-Cancel-Token"


def _store() -> BatchStore:
    return services().batches


def _runner() -> BatchRunner:
    return services().batch_runner


def batch_links(batch_id: str) -> dict[str, str]:
    """The links a batch's status shows: its status, events, results and page (paths)."""
    return {
        "self": f"/api/batches/{batch_id}",
        "events": f"/api/batches/{batch_id}/events",
        "results": f"/api/batches/{batch_id}/results",
        "page": f"/batches/{batch_id}",
    }


def _parse_upload() -> tuple[batch_input.ParsedBatch, str]:
    """The batch in the request (JSON, a CSV body or a multipart `file`) and a name for it."""
    settings = services().settings
    rows = settings.batch_max_rows
    mimetype = request.mimetype
    try:
        if request.is_json:
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or "identifiers" not in body:
                raise ApiError(
                    400, "invalid_request", 'send {"identifiers": [...]} (strings or {identifier, type})'
                )
            name = body.get("name")
            if name is not None and not isinstance(name, str):  # as POST /api/lookups: no silent drop
                raise ApiError(400, "invalid_request", "name must be a string", "name")
            return batch_input.parse_json(body["identifiers"], rows), name or ""
        if mimetype == "multipart/form-data":
            upload = request.files.get("file")
            if upload is None:
                raise ApiError(400, "invalid_request", "send the CSV in the multipart field `file`", "file")
            return batch_input.parse_csv(batch_input.decode(upload.read()), rows), upload.filename or ""
        if mimetype in CSV_TYPES:
            return batch_input.parse_csv(batch_input.decode(request.get_data()), rows), ""
    except batch_input.BatchRejected as error:
        raise ApiError(400, "invalid_batch", str(error)) from error
    raise ApiError(
        415,
        "unsupported_media_type",
        "send application/json {identifiers: [...]}, a text/csv body, or multipart/form-data with `file`",
    )


@batch_api.post("/api/batches")
def create_batch():
    """202: the batch's status, its `invalid` lines and its `cancel_token` (shown this once: the
    `X-Cancel-Token` that `DELETE /api/batches/<id>` needs)."""
    parsed, name = _parse_upload()
    if not parsed.unique and not parsed.invalid:
        raise ApiError(400, "invalid_batch", "the batch holds no identifiers")
    try:
        # The client's address as the per-client limits see it (ProxyFix behind TRUSTED_PROXIES).
        body = _runner().create(parsed, name, client=request.remote_addr or "unknown")
    except StorageFull as full:
        whose = "all batches together" if full.scope == "all" else "this address's batches"
        raise ApiError(
            503,
            "storage_full",
            f"{whose} hold as much as the service keeps; retry once older batches are deleted",
            headers={"Retry-After": str(full.retry_after)},
        ) from full
    body["invalid"] = [entry.to_dict() for entry in parsed.invalid]
    return json_response(body, 202, {"Location": body["links"]["self"]})


def _status(batch_id: str) -> dict:
    """The batch's status as read; a batch whose steps stopped gets one (README: when its status is read)."""
    body = _runner().shown_status(batch_id)
    if body is None:
        raise ApiError(404, "not_found", "no batch with this id (unknown or expired)")
    return body


@batch_api.get("/api/batches/<batch_id>")
def get_batch(batch_id: str):
    return json_response(_status(batch_id))


@batch_api.delete("/api/batches/<batch_id>")
def cancel_batch(batch_id: str):
    """Cancel the items not started; needs the batch's `cancel_token` in the `X-Cancel-Token` header.

    404 unknown batch; 403 `forbidden` without the header or with another token (whoever has only
    the shared id watches, never cancels); 409 when already complete; else 200 with the status.
    """
    allowed = _store().cancel_token_matches(batch_id, request.headers.get(CANCEL_TOKEN_HEADER))
    if allowed is None:
        raise ApiError(404, "not_found", "no batch with this id (unknown or expired)")
    if not allowed:
        log.info("batch %s: cancel refused (no or another %s)", batch_id, CANCEL_TOKEN_HEADER)
        raise ApiError(
            403,
            "forbidden",
            f"cancelling a batch takes the cancel_token its creation returned, in {CANCEL_TOKEN_HEADER}",
        )
    status = _runner().cancel(batch_id)
    if status is None:
        raise ApiError(404, "not_found", "no batch with this id (unknown or expired)")
    body = _status(batch_id)
    if status == "complete":
        raise ApiError(409, "conflict", "the batch is already complete; nothing is left to cancel")
    log.info("batch %s cancelled: %d items not started", batch_id, body["counts"]["cancelled"])
    return json_response(body)


@batch_api.get("/api/batches/<batch_id>/events")
def batch_events(batch_id: str):
    """SSE: `snapshot` (the status), `progress` after each change, `complete` at the end
    (its `status` says complete or cancelled)."""
    _runner().kick_if_stalled(batch_id)  # its status is read: a batch whose steps stopped gets one
    return sse.stream_channel(
        BatchStore.channel(batch_id),
        lambda: _runner().status(batch_id),
        lambda snapshot: snapshot["finished_at"] is not None,
        "no batch with this id (unknown or expired)",
    )


@batch_api.get("/api/batches/<batch_id>/results")
def batch_results(batch_id: str):
    """One row per input line, in input order, streamed as it is read from Redis."""
    fmt = request.args.get("format", "csv")
    if fmt not in ("csv", "jsonl"):
        raise ApiError(400, "invalid_request", "format must be csv or jsonl", "format")
    if not _store().exists(batch_id):
        raise ApiError(404, "not_found", "no batch with this id (unknown or expired)")
    rows = _store().rows(batch_id)
    if fmt == "csv":
        body, mimetype = csv_lines(rows), "text/csv"
    else:
        body, mimetype = jsonl_lines(rows), "application/x-ndjson"
    response = Response(stream_with_context(body), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="batch-{batch_id}.{fmt}"'
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app) -> None:
    app.register_blueprint(batch_api)
