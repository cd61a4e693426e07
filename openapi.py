"""The OpenAPI 3.0 document of the JSON API, served at `GET /api/openapi.json`.

Kept by hand as data next to the routes it describes (the routes are plain Flask views, not
generated from schemas); tests/test_openapi.py checks that every API route is documented and
runs schemathesis against the document.
"""

from __future__ import annotations

from flask import Blueprint

from api_errors import json_response

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
ID_PARAMETER = {"in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 64}}

INTEGERS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
NUMBERS_OR_NULL = {"type": "array", "items": NUMBER_OR_NULL}

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
        "properties": {
            "id": {"type": "string"},
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
                "required": ["self", "events"],
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
            "lookup_id": {"type": "string"},
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
                "200": _json("complete, from the cache", "Lookup"),
                "202": {
                    **_json("queued or running; follow links.events", "Lookup"),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                "400": _error("invalid identifier or request"),
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
            "parameters": [{"name": "lookup_id", **ID_PARAMETER}],
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
            "parameters": [
                {"name": "lookup_id", **ID_PARAMETER},
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"},
                },
                {
                    "name": "last_event_id",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"},
                },
            ],
            "responses": {
                "200": {
                    "description": "text/event-stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "400": _error("malformed Last-Event-ID"),
                "404": _error("unknown or expired lookup"),
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
                        "type": {"type": "string", "enum": ["cnpj", "cep", "cpf"]},
                        "identifier": {"type": "string"},
                    },
                }
            ),
            "responses": {
                "200": _json("done", {"type": "object"}),
                "400": _error("bad request"),
                "401": UNAUTHORIZED,
                "403": ADMIN_DISABLED,
                "413": TOO_LARGE,
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
                "403": ADMIN_DISABLED,
                "404": _error("no such source"),
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
                "403": ADMIN_DISABLED,
                "404": _error("no such source"),
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
                "403": ADMIN_DISABLED,
                "404": _error("no such flag"),
                "413": TOO_LARGE,
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
                "403": ADMIN_DISABLED,
                "404": _error("no such dead letter"),
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
