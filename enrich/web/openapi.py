"""The OpenAPI 3.0 document of the JSON API, served at `GET /api/openapi.json`.

Kept by hand as data next to the routes it describes (the routes are plain Flask views, not
generated from schemas); tests/test_openapi.py checks that every API route is documented and
runs schemathesis against the document.
"""

from __future__ import annotations

from flask import Blueprint

from enrich.api_errors import json_response
from enrich.batches.record import ITEM_STATES
from enrich.batches.rows import CSV_COLUMNS
from enrich.lookups import MAX_LOOKUP_ID_LENGTH

docs = Blueprint("openapi", __name__)

SOURCE_STATES = [
    "pending",
    "running",
    "retrying",
    "ok",
    "not_found",
    "error",
    "stale",
    "rate_limited",
    "circuit_open",
]
NUMBER_OR_NULL = {"type": "number", "nullable": True}


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: str | dict) -> dict:
    schema = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_body(schema: str | dict) -> dict:
    """A required JSON request body (a schema's name, or the schema itself)."""
    schema = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"required": True, "content": {"application/json": {"schema": schema}}}


UNAVAILABLE = _error("Redis unreachable")
UNAUTHORIZED = _error("missing or wrong bearer token")
ADMIN_DISABLED = _error("the admin API is off: ADMIN_TOKEN is unset")
TOO_LARGE = _error("body larger than MAX_REQUEST_BYTES")
CROSS_ORIGIN = (  # every POST, PUT, PATCH and DELETE (origin_check.py)
    "cross_origin: sent from another site's page (an Origin, or without one a Referer, that is neither "
    "this service's own origin nor in ALLOWED_ORIGINS, or is null); nothing is done"
)
ADMIN_FORBIDDEN = _error(f"admin_disabled: the admin API is off, ADMIN_TOKEN is unset; or {CROSS_ORIGIN}")
ADMIN_THROTTLED = {
    **_error(
        "rate_limited: this client address failed admin authentication (401) ADMIN_AUTH_LIMIT times "
        "(default 10 a minute); every admin call from it, the right token's too, is refused until Retry-After"
    ),
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}
ID_PARAMETER = {"in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 64}}
LOOKUP_ID_PARAMETER = {
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_LOOKUP_ID_LENGTH},
}

INTEGERS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
NUMBERS_OR_NULL = {"type": "array", "items": NUMBER_OR_NULL}
COUNT = {"type": "integer", "minimum": 0}

# The event streams resume after the id of the last event read (a Redis stream id), from the
# header a reconnecting EventSource sends or from the query string.
EVENT_ID = {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"}
LAST_EVENT_ID = [
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": EVENT_ID},
    {"name": "last_event_id", "in": "query", "required": False, "schema": EVENT_ID},
]


def _event_stream(description: str, events: list[str] | None = None) -> dict:
    """A 200 of Server-Sent Events; its schema is one event as a client parses it."""
    event = {"type": "string"} if events is None else {"type": "string", "enum": events}
    schema = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": event,
            "data": {"type": "string", "description": description},
            "id": {"type": "string", "description": "the Last-Event-ID to resume after this event"},
            "retry": {"type": "integer"},
        },
    }
    return {"description": "text/event-stream", "content": {"text/event-stream": {"schema": schema}}}


BATCH_ID = {"name": "batch_id", **ID_PARAMETER}
BATCH_UNKNOWN = _error("unknown or expired batch")
CANCEL_TOKEN = {
    "name": "X-Cancel-Token",
    "in": "header",
    "required": True,
    "description": "the cancel_token that POST /api/batches returned for this batch (the id alone is for watching)",
    "schema": {"type": "string"},
}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string"},
            "message": {"type": "string"},
            "field": {"type": "string"},
        },
    },
    "LookupRequest": {
        "type": "object",
        "required": ["identifier"],
        "properties": {
            "identifier": {
                "type": "string",
                "description": "CNPJ (numeric or alphanumeric), CEP or CPF; masked or bare",
            },
            "type": {"type": "string", "enum": ["cnpj", "cep", "cpf"]},
            "priority": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5},
            "refresh": {"type": "boolean", "default": False},
        },
    },
    "SourceResult": {
        "type": "object",
        "required": [
            "source",
            "state",
            "data",
            "cached",
            "stale",
            "elapsed_ms",
            "error",
            "scheduled_at",
            "attempts",
        ],
        "properties": {
            "source": {"type": "string"},
            "state": {"type": "string", "enum": SOURCE_STATES},
            "data": {"type": "object", "nullable": True},
            "cached": {"type": "boolean"},
            "stale": {"type": "boolean"},
            "elapsed_ms": NUMBER_OR_NULL,
            "error": {"type": "string", "nullable": True},
            "scheduled_at": NUMBER_OR_NULL,
            "attempts": {"type": "integer", "minimum": 0},
            "updated_at": NUMBER_OR_NULL,
        },
    },
    "Check": {
        "type": "object",
        "required": ["name", "status", "detail"],
        "properties": {
            "name": {"type": "string"},
            "status": {"type": "string", "enum": ["pass", "fail", "unverified"]},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "params": {"type": "object"},
        },
    },
    "Lookup": {
        "type": "object",
        "required": [
            "id",
            "status",
            "type",
            "identifier",
            "priority",
            "cached",
            "created_at",
            "deadline_at",
            "completed_at",
            "progress",
            "sources",
            "tasks",
            "result",
            "checks",
            "links",
        ],
        "description": "One request's view of a lookup.  A request that joins a lookup already running "
        "for the same identifier (single flight) gets an id, priority, times and call ids (`tasks`) of its "
        "own over the shared work; no other client's id or priority ever appears in it.  A CPF is answered "
        "at once from the number alone: `id` null, no `sources` or `tasks`, `links` empty, and `result` "
        "`{cpf, valido, regiao_fiscal, ufs}` (the fiscal region is the ninth digit); nothing is stored.",
        "properties": {
            "id": {
                "type": "string",
                "nullable": True,
                "description": "this request's own lookup id; null for a CPF (nothing is stored to read back)",
            },
            "status": {"type": "string", "enum": ["queued", "running", "partial", "complete"]},
            "type": {"type": "string", "enum": ["cnpj", "cep", "cpf"]},
            "identifier": {"type": "string"},
            "priority": {"type": "integer", "minimum": 1, "maximum": 10},
            "cached": {"type": "boolean"},
            "created_at": {"type": "number"},
            "deadline_at": {"type": "number"},
            "completed_at": NUMBER_OR_NULL,
            "progress": {
                "type": "object",
                "required": ["done", "total"],
                "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}},
            },
            "sources": {
                "type": "object",
                "additionalProperties": {"$ref": "#/components/schemas/SourceResult"},
            },
            "tasks": {"type": "object", "additionalProperties": {"type": "string"}},
            "result": {"type": "object", "nullable": True},
            "checks": {"type": "array", "items": {"$ref": "#/components/schemas/Check"}},
            "links": {
                "type": "object",
                "description": "`self` and `events`; empty for a CPF",
                "properties": {"self": {"type": "string"}, "events": {"type": "string"}},
            },
        },
    },
    "Task": {
        "type": "object",
        "required": ["task_id", "name", "state", "lookup_id", "date_done"],
        "properties": {
            "task_id": {"type": "string"},
            "name": {"type": "string"},
            "state": {"type": "string"},
            "lookup_id": {
                "type": "string",
                "description": "the id of the lookup that issued this call id, as that request knows it",
            },
            "source": {"type": "string", "nullable": True},
            "result": {"nullable": True},
            "error": {"type": "string"},
            "date_done": {"type": "string", "nullable": True},
        },
    },
    "Breaker": {
        "type": "object",
        "required": [
            "name",
            "state",
            "failures",
            "successes",
            "opened_at",
            "fail_max",
            "reset_timeout",
            "success_threshold",
        ],
        "properties": {
            "name": {"type": "string"},
            "state": {"type": "string", "enum": ["closed", "open", "half-open"]},
            "failures": {"type": "integer", "minimum": 0},
            "successes": {"type": "integer", "minimum": 0},
            "opened_at": NUMBER_OR_NULL,
            "fail_max": {"type": "integer"},
            "reset_timeout": {"type": "number"},
            "success_threshold": {"type": "integer"},
        },
    },
    "StatusHistory": {
        "type": "object",
        "required": [
            "time",
            "minutes",
            "bucket_seconds",
            "buckets",
            "lookups_per_second",
            "lookups_answered",
            "lookups_started",
            "lookups_finished",
            "p95_ms",
            "cache_hit_rate",
            "queue_depth",
            "rate_limit_waits",
            "breakers",
        ],
        "properties": {
            "time": {"type": "number"},
            "minutes": {"type": "integer", "minimum": 1, "maximum": 60},
            "bucket_seconds": {"type": "integer", "minimum": 1},
            "buckets": {"type": "array", "items": {"type": "integer"}},
            "lookups_per_second": {"type": "array", "items": {"type": "number", "minimum": 0}},
            "lookups_answered": INTEGERS,
            "lookups_started": INTEGERS,
            "lookups_finished": INTEGERS,
            "p95_ms": NUMBERS_OR_NULL,
            "cache_hit_rate": NUMBERS_OR_NULL,
            "queue_depth": {"type": "array", "items": {"type": "integer", "nullable": True}},
            "rate_limit_waits": INTEGERS,
            "breakers": {
                "type": "object",
                "additionalProperties": {
                    "type": "array",
                    # null: no sample in that bucket (OpenAPI 3.0 wants null in a nullable enum).
                    "items": {
                        "type": "string",
                        "enum": ["closed", "half-open", "open", None],
                        "nullable": True,
                    },
                },
            },
        },
    },
}

PATHS = {
    "/api/lookups": {
        "post": {
            "summary": "Start a lookup (or answer it from the cache)",
            "requestBody": _json_body("LookupRequest"),
            "responses": {
                "200": _json(
                    "complete: from the cache, or a CPF answered from the number alone (id null, "
                    "no sources, no Location, nothing stored)",
                    "Lookup",
                ),
                "202": {
                    **_json("queued or running; follow links.events", "Lookup"),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                "400": _error("invalid identifier or request"),
                "403": _error(CROSS_ORIGIN),
                "413": TOO_LARGE,
                "429": {
                    **_error("over LOOKUP_RATE_LIMIT for this client"),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                },
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/lookups/{lookup_id}": {
        "get": {
            "summary": "A lookup: status, sources, merged result, cross-checks",
            "parameters": [{"name": "lookup_id", **LOOKUP_ID_PARAMETER}],
            "responses": {
                "200": _json("the lookup", "Lookup"),
                "404": _error("unknown or expired"),
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/lookups/{lookup_id}/events": {
        "get": {
            "summary": "Server-Sent Events: snapshot, the logged events after Last-Event-ID, then live ones",
            "parameters": [{"name": "lookup_id", **LOOKUP_ID_PARAMETER}, *LAST_EVENT_ID],
            "responses": {
                "200": _event_stream("JSON: the lookup (snapshot, complete) or what changed"),
                "400": _error("malformed Last-Event-ID"),
                "404": _error("unknown or expired lookup"),
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/batches": {
        "post": {
            "summary": "Start a bulk batch: a JSON list, a CSV body, or a CSV file in the multipart field `file`",
            "description": "One results row per input line: a bad line is listed in `invalid` and answered "
            "as an `invalid` row, never failing the batch.  Its distinct identifiers (its items) are looked "
            "up at the lowest priority, a few at a time; the cached ones settle at once.  A CSV has one "
            "identifier a row and an optional type column, `,` or `;` separated, an optional "
            "`identifier[,type]` header, UTF-8 (a byte-order mark is dropped); text/plain, application/csv "
            "and application/vnd.ms-excel bodies are read as CSV too.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}},
                    "text/csv": {
                        # Any text is a CSV (of invalid lines, maybe): there is no wrong body to send.
                        "schema": {"description": "the CSV, UTF-8"},
                        "example": "identifier;type\r\n11.222.333/0001-81;cnpj\r\n01310-100;\r\n",
                    },
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                },
            },
            "responses": {
                "202": {
                    **_json("created; follow links.events or poll links.self", "BatchCreated"),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                "400": _error(
                    "invalid_batch: over BATCH_MAX_ROWS rows, not UTF-8, or no identifiers; "
                    "invalid_request: the body's shape or the multipart field"
                ),
                "403": _error(CROSS_ORIGIN),
                "413": _error("body larger than BATCH_MAX_BYTES"),
                "415": _error("not JSON, CSV or multipart/form-data"),
                "429": {
                    **_error("over BATCH_RATE_LIMIT for this client"),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                },
                "503": {
                    **_error(
                        "unavailable: Redis unreachable; or storage_full: the batches kept already hold "
                        "BATCH_STORAGE_MAX_BYTES, or this address's BATCH_STORAGE_PER_CLIENT_BYTES"
                    ),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                },
            },
        }
    },
    "/api/batches/{batch_id}": {
        "get": {
            "summary": "A batch: status, counts by item state, ETA",
            "parameters": [BATCH_ID],
            "responses": {"200": _json("the batch", "BatchStatus"), "404": BATCH_UNKNOWN, "503": UNAVAILABLE},
        },
        "delete": {
            "summary": "Cancel a batch's items not started yet (those in flight finish); again is a no-op",
            "description": "Needs the batch's cancel_token in X-Cancel-Token: whoever has only the batch's "
            "id (its shared link) can watch it but not cancel it.  The operator's `flask batch cancel` "
            "needs none.",
            "parameters": [BATCH_ID, CANCEL_TOKEN],
            "responses": {
                "200": _json("the batch, cancelled", "BatchStatus"),
                "403": _error(
                    "forbidden: no X-Cancel-Token, or not this batch's cancel_token (compared in constant "
                    f"time); nothing is cancelled; or {CROSS_ORIGIN}"
                ),
                "404": BATCH_UNKNOWN,
                "409": _error("already complete: nothing is left to cancel"),
                "503": UNAVAILABLE,
            },
        },
    },
    "/api/batches/{batch_id}/events": {
        "get": {
            "summary": "Server-Sent Events: `snapshot`, then `progress` after each change, then `complete`",
            "description": "Each event's data is the batch's status (BatchStatus); `complete`'s `status` "
            "says complete or cancelled, and the stream ends after it.  Resumes after Last-Event-ID "
            "as the lookup events do.",
            "parameters": [BATCH_ID, *LAST_EVENT_ID],
            "responses": {
                "200": _event_stream(
                    "JSON: the batch's status (BatchStatus)", ["snapshot", "progress", "complete"]
                ),
                "400": _error("malformed Last-Event-ID"),
                "404": BATCH_UNKNOWN,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/batches/{batch_id}/results": {
        "get": {
            "summary": "The results, streamed: one row per input line, in input order",
            "description": f"CSV columns: {', '.join(CSV_COLUMNS)} (`sources`: `name=state` pairs "
            "joined by `;`).  JSON lines: one BatchRow a line.  Rows of items not settled yet are "
            "`pending` or `running`, without fields.",
            "parameters": [
                BATCH_ID,
                {
                    "name": "format",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["csv", "jsonl"], "default": "csv"},
                },
            ],
            "responses": {
                "200": {
                    "description": "the rows (an attachment named batch-<id>.<format>)",
                    "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                    "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                    },
                },
                "400": _error("format is not csv or jsonl"),
                "404": BATCH_UNKNOWN,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/tasks/{task_id}": {
        "get": {
            "summary": "A Celery task the service issued",
            "parameters": [{"name": "task_id", **ID_PARAMETER}],
            "responses": {
                "200": _json("the task", "Task"),
                "404": _error("never issued by the service"),
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/status": {
        "get": {
            "summary": "Breakers, rate limits, queues, workers, cache, last beat reports",
            "responses": {
                "200": _json(
                    "the service's state",
                    {
                        "type": "object",
                        "required": [
                            "time",
                            "breakers",
                            "rate_limits",
                            "queues",
                            "workers",
                            "cache",
                            "dead_letters",
                        ],
                        "properties": {
                            "time": {"type": "number"},
                            "breakers": {
                                "type": "object",
                                "additionalProperties": {"$ref": "#/components/schemas/Breaker"},
                            },
                            "rate_limits": {
                                "type": "object",
                                "additionalProperties": {
                                    "type": "object",
                                    "required": ["rate_per_minute", "burst", "tokens"],
                                    "properties": {
                                        "rate_per_minute": {"type": "number"},
                                        "burst": {"type": "integer"},
                                        "tokens": {"type": "number"},
                                    },
                                },
                            },
                            "queues": {
                                "type": "object",
                                "required": ["by_priority", "deferred"],
                                "properties": {
                                    "by_priority": {
                                        "type": "object",
                                        "additionalProperties": {"type": "integer", "minimum": 0},
                                    },
                                    "deferred": {"type": "integer", "minimum": 0},
                                },
                            },
                            "workers": {"type": "array", "items": {"type": "string"}},
                            "cache": {"type": "object"},
                            "dead_letters": {"type": "integer", "minimum": 0},
                            "flags": {"type": "object", "additionalProperties": {"type": "boolean"}},
                            "health_check": {"type": "object", "nullable": True},
                            "cleanup": {"type": "object", "nullable": True},
                            "event_streams": {"type": "object"},
                        },
                    },
                ),
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/status/history": {
        "get": {
            "summary": "The status page's charts: one point per 10 s bucket, cluster-wide, oldest first",
            "parameters": [
                {
                    "name": "minutes",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 60, "default": 15},
                }
            ],
            "responses": {
                "200": _json("the series", "StatusHistory"),
                "400": _error("minutes is not an integer from 1 to 60"),
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": _json("OpenAPI 3.0", {"type": "object"})}}
    },
    "/healthz": {
        "get": {
            "summary": "The process is alive",
            "responses": {
                "200": _json(
                    "alive",
                    {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
                )
            },
        }
    },
    "/readyz": {
        "get": {
            "summary": "Redis reachable and a worker heartbeat fresh",
            "responses": {"200": _json("ready", "Readiness"), "503": _json("not ready", "Readiness")},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics: every gunicorn worker's, and the cluster state read from Redis",
            "description": "Always 200: with Redis unreachable the processes' metrics and `enrich_redis_up 0`. "
            "OpenMetrics when the Accept header asks for it (Prometheus does).",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                }
            },
        }
    },
    "/api/admin/cache/invalidate": {
        "post": {
            "summary": 'Invalidate: {"all": true} (generation bump), {"type"} or {"type", "identifier"}',
            "security": [{"bearer": []}],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "all": {"type": "boolean", "enum": [True]},
                        "type": {"type": "string", "enum": ["cnpj", "cep"]},
                        "identifier": {"type": "string"},
                    },
                }
            ),
            "responses": {
                "200": _json("done", {"type": "object"}),
                "400": _error("bad request"),
                "401": UNAUTHORIZED,
                "403": ADMIN_FORBIDDEN,
                "413": TOO_LARGE,
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/admin/breakers/{source}/reset": {
        "post": {
            "summary": "Close a breaker",
            "security": [{"bearer": []}],
            "parameters": [{"name": "source", **ID_PARAMETER}],
            "responses": {
                "200": _json("its state", "Breaker"),
                "401": UNAUTHORIZED,
                "403": ADMIN_FORBIDDEN,
                "404": _error("no such source"),
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/admin/breakers/{source}/open": {
        "post": {
            "summary": "Force a breaker open",
            "security": [{"bearer": []}],
            "parameters": [{"name": "source", **ID_PARAMETER}],
            "responses": {
                "200": _json("its state", "Breaker"),
                "401": UNAUTHORIZED,
                "403": ADMIN_FORBIDDEN,
                "404": _error("no such source"),
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/admin/flags": {
        "get": {
            "summary": "Feature flags: each one's value, where it comes from, its setting's default",
            "security": [{"bearer": []}],
            "responses": {
                "200": _json(
                    "every flag",
                    {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Flag"}},
                ),
                "401": UNAUTHORIZED,
                "403": ADMIN_DISABLED,
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/admin/flags/{name}": {
        "put": {
            "summary": 'Turn a flag on or off cluster-wide without a restart ({"enabled": null}: back to its setting)',
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["rate_limiting", "circuit_breaker", "cache"]},
                }
            ],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["enabled"],
                    "additionalProperties": False,
                    "properties": {"enabled": {"type": "boolean", "nullable": True}},
                }
            ),
            "responses": {
                "200": _json("the flag now", "Flag"),
                "400": _error("bad body"),
                "401": UNAUTHORIZED,
                "403": ADMIN_FORBIDDEN,
                "404": _error("no such flag"),
                "413": TOO_LARGE,
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/admin/dead-letters": {
        "get": {
            "summary": "Calls that exhausted their retries",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                }
            ],
            "responses": {
                "200": _json(
                    "the list",
                    {
                        "type": "object",
                        "required": ["count", "items"],
                        "properties": {"count": {"type": "integer"}, "items": {"type": "array"}},
                    },
                ),
                "400": _error("bad limit"),
                "401": UNAUTHORIZED,
                "403": ADMIN_DISABLED,
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/admin/dead-letters/{entry_id}/requeue": {
        "post": {
            "summary": "Run a dead letter's call again",
            "security": [{"bearer": []}],
            "parameters": [{"name": "entry_id", **ID_PARAMETER}],
            "responses": {
                "202": _json("queued again", {"type": "object", "required": ["task_id"]}),
                "401": UNAUTHORIZED,
                "403": ADMIN_FORBIDDEN,
                "404": _error("no such dead letter"),
                "429": ADMIN_THROTTLED,
                "503": UNAVAILABLE,
            },
        }
    },
}

SCHEMAS["Flag"] = {
    "type": "object",
    "required": ["enabled", "source", "default"],
    "properties": {
        "name": {"type": "string"},
        "enabled": {"type": "boolean"},
        "source": {"type": "string", "enum": ["redis", "settings"]},
        "default": {"type": "boolean"},
    },
}

SCHEMAS["Readiness"] = {
    "type": "object",
    "required": ["ready", "redis", "workers"],
    "properties": {
        "ready": {"type": "boolean"},
        "redis": {"type": "boolean"},
        "workers": {"type": "array", "items": {"type": "string"}},
        "error": {"type": "string"},
    },
}

SCHEMAS["BatchRequest"] = {
    "type": "object",
    "required": ["identifiers"],
    "properties": {
        "identifiers": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10_000,
            "description": "At most BATCH_MAX_ROWS (10,000 by default).",
            # Not a schema of the items: a bad item is an invalid line of the batch (reported with
            # its reason, answered as an `invalid` row), never a refused request.
            "items": {
                "description": "a string (CNPJ, CEP or CPF, masked or bare; the type is detected) or "
                "{identifier, type}; anything else is an invalid line"
            },
            "example": ["11.222.333/0001-81", {"identifier": "01310100", "type": "cep"}],
        },
        "name": {
            "type": "string",
            "nullable": True,
            "description": "shown with the batch (its first 200 characters)",
        },
    },
}

SCHEMAS["InvalidLine"] = {
    "type": "object",
    "required": ["line", "value", "reason"],
    "properties": {
        "line": {
            "type": "integer",
            "minimum": 1,
            "description": "CSV: the file's line; JSON: the item's position",
        },
        "value": {"type": "string"},
        "reason": {"type": "string"},
    },
}

SCHEMAS["BatchStatus"] = {
    "type": "object",
    "required": [
        "id",
        "status",
        "name",
        "total",
        "lines",
        "invalid_lines",
        "duplicates",
        "cached",
        "done",
        "counts",
        "created_at",
        "cancelled_at",
        "finished_at",
        "eta_seconds",
        "throughput_per_second",
        "rate_limit_per_second",
        "links",
    ],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["running", "complete", "cancelled"]},
        "name": {"type": "string", "nullable": True},
        "total": {**COUNT, "description": "items: the distinct identifiers"},
        "lines": {**COUNT, "description": "input lines, valid or not"},
        "invalid_lines": {**COUNT, "description": "invalid input lines"},
        "duplicates": {**COUNT, "description": "valid lines whose identifier an earlier line named"},
        "cached": {**COUNT, "description": "items settled from the cache when the batch was created"},
        "done": {**COUNT, "description": "items settled"},
        "counts": {
            "type": "object",
            "description": "items by state",
            "required": list(ITEM_STATES),
            "properties": {state: COUNT for state in ITEM_STATES},
        },
        "created_at": {"type": "number"},
        "cancelled_at": NUMBER_OR_NULL,
        "finished_at": {**NUMBER_OR_NULL, "description": "set: nothing about the batch will change"},
        "eta_seconds": {**NUMBER_OR_NULL, "description": "0 once finished; null when no pace is known"},
        "throughput_per_second": {**NUMBER_OR_NULL, "description": "items a second, measured lately"},
        "rate_limit_per_second": {**NUMBER_OR_NULL, "description": "items a second the rate limits allow"},
        "links": {
            "type": "object",
            "required": ["self", "events", "results", "page"],
            "properties": {name: {"type": "string"} for name in ("self", "events", "results", "page")},
        },
    },
}

# The answer to POST /api/batches: the status and `invalid`, the invalid lines themselves.
SCHEMAS["BatchCreated"] = {
    **SCHEMAS["BatchStatus"],
    "required": [*SCHEMAS["BatchStatus"]["required"], "invalid", "cancel_token"],
    "properties": {
        **SCHEMAS["BatchStatus"]["properties"],
        "invalid": {"type": "array", "items": {"$ref": "#/components/schemas/InvalidLine"}},
        "cancel_token": {
            "type": "string",
            "description": "shown this once: send it as X-Cancel-Token to DELETE /api/batches/{batch_id}; "
            "never in the status, events or results (the service keeps only its SHA-256)",
        },
    },
}

SCHEMAS["BatchRow"] = {
    "type": "object",
    "description": "A results row (GET /api/batches/{batch_id}/results?format=jsonl: one a line)",
    "required": ["line", "input", "type", "identifier", "state", "fields", "sources", "error", "lookup_id"],
    "properties": {
        "line": {"type": "integer", "minimum": 1},
        "input": {"type": "string"},
        "type": {"type": "string", "enum": ["cnpj", "cep", "cpf"], "nullable": True},
        "identifier": {"type": "string", "nullable": True},
        "state": {"type": "string", "enum": ["invalid", *ITEM_STATES]},
        "fields": {"type": "object", "description": "the type's main fields (razao_social, municipio, ...)"},
        "sources": {"type": "object", "additionalProperties": {"type": "string", "enum": SOURCE_STATES}},
        "error": {"type": "string", "nullable": True},
        "lookup_id": {"type": "string", "nullable": True},
    },
}

DOCUMENT = {
    "openapi": "3.0.3",
    "info": {
        "title": "Enrichment lookup",
        "version": "1.0",
        "description": "Lookups of Brazilian identifiers (CNPJ, CEP, CPF) across public APIs, live.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}


@docs.get("/api/openapi.json")
def openapi_document():
    return json_response(DOCUMENT)
