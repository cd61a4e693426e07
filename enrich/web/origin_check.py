"""Refuses state-changing requests sent from another site's page: the Origin (or Referer) check.

A page on any site can make its visitors' browsers send a "simple" POST (a `text/plain`, form or
multipart body) without a CORS preflight, with the visitor's address and so the visitor's rate
limits.  The browser names the page's origin in `Origin` (older ones only in `Referer`), which a
page cannot change.  So a POST, PUT, PATCH or DELETE whose Origin, or without one whose Referer,
is neither this service's own origin nor in ALLOWED_ORIGINS, or is `null` (a sandboxed frame, a
file), is refused 403 `cross_origin`.  A request with neither header (curl, scripts, the CLI) is
not a browser's cross-site request and goes on; reads are never refused.

Hand-written: the well-kept CSRF libraries (flask-wtf, flask-seasurf) guard form posts with a
session and a secret token per form, which a JSON API used by curl and scripts has no place for;
none checks Origin alone.  Flask's own origin is what the service sees of the request (its scheme
and Host); X-Forwarded-Proto/-Host count only through client_limits.py's ProxyFix, which wraps the
WSGI app and so has rewritten both before any hook runs, and only behind TRUSTED_PROXIES.
"""

from __future__ import annotations

import logging

from flask import Flask, request

from enrich.api_errors import ApiError
from enrich.services import services
from enrich.settings import normalise_origin, parse_allowed_origins

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
log = logging.getLogger("api")


def own_origin() -> str | None:
    """This request's own origin as the service sees it (scheme and Host); None when Host is malformed."""
    try:
        return normalise_origin(f"{request.scheme}://{request.host}")
    except ValueError:
        return None


def claimed_origin() -> str | None:
    """The origin the browser names for the page that sent this request ("" when it names none).

    None for `Origin: null` and for any value that is not an http(s) origin: those are never
    this service's own, nor allowed.
    """
    origin = request.headers.get("Origin")
    referer = request.headers.get("Referer")
    if origin is None and referer is None:
        return ""
    try:
        if origin is not None:
            return None if origin.strip() == "null" else normalise_origin(origin)
        return normalise_origin(referer or "", whole_url=True)
    except ValueError:
        return None


def check_origin(allowed: frozenset[str]) -> None:
    """Raise 403 `cross_origin` for a state-changing request from another site's page (see module docstring)."""
    if request.method not in STATE_CHANGING:
        return
    claimed = claimed_origin()
    if claimed == "":
        return  # no Origin, no Referer: not sent by a page in a browser
    own = own_origin()
    if claimed is not None and (claimed == own or claimed in allowed):
        return
    log.info("refused a cross-origin %s %s from %s", request.method, request.path, claimed or "null")
    raise ApiError(
        403,
        "cross_origin",
        f"this {request.method} came from another site's page ({claimed or 'an opaque origin, null'}); "
        f"only this service's own pages ({own}) and the origins in ALLOWED_ORIGINS may send it",
    )


def init_app(app: Flask) -> None:
    """Check every request's origin before anything else runs (rate limits and admin checks included)."""
    allowed = parse_allowed_origins(services(app).settings.allowed_origins)
    app.before_request(lambda: check_origin(allowed))
