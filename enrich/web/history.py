"""The status page's history endpoint: `GET /api/status/history?minutes=N`."""

from __future__ import annotations

import re

from flask import Blueprint, request

from enrich import maintenance
from enrich.api_errors import ApiError, json_response
from enrich.services import services
from enrich.status_history import DEFAULT_MINUTES, MAX_MINUTES

history_api = Blueprint("status_history", __name__)
_MINUTES = re.compile(r"[0-9]{1,2}")


@history_api.get("/api/status/history")
def status_history():
    raw = request.args.get("minutes", str(DEFAULT_MINUTES))
    if not _MINUTES.fullmatch(raw) or not 1 <= int(raw) <= MAX_MINUTES:
        raise ApiError(
            400, "invalid_request", f"minutes must be an integer from 1 to {MAX_MINUTES}", "minutes"
        )
    return json_response(maintenance.status_history_series(services(), int(raw)))
