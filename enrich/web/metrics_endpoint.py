"""The web `/metrics` route: every gunicorn worker's metrics and the cluster state in Redis, in one scrape."""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, request
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder

from enrich.cluster_metrics import ClusterState
from enrich.metrics import MULTIPROC_ENV, warn_rate_limited
from enrich.services import services


class _ThisProcess:
    """The default registry (this process's metrics), as one collector of a scrape's registry."""

    def collect(self):
        return REGISTRY.collect()


def _process_collector(registry: CollectorRegistry) -> None:
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        try:
            multiprocess.MultiProcessCollector(registry, path=directory)
            return
        except ValueError as error:  # the directory is gone: this worker's own numbers, not a 500
            warn_rate_limited("multiprocess metrics", error)
    registry.register(_ThisProcess())


blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
def scrape() -> Response:
    """Prometheus text format: every gunicorn worker's metrics and the cluster state in Redis."""
    registry = CollectorRegistry(auto_describe=False)
    _process_collector(registry)
    registry.register(ClusterState(services()))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), content_type=content_type)


def init_app(app: Any) -> None:
    """Register the `/metrics` route."""
    app.register_blueprint(blueprint)
