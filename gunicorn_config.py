"""gunicorn settings of the web app (`-c gunicorn_config.py`): one /metrics for all its workers.

prometheus-client's multiprocess mode: each worker writes its metrics to files in one directory
(PROMETHEUS_MULTIPROC_DIR, from METRICS_DIR, default DATA_DIR/metrics) and the worker that
answers a scrape reads them all.  The variable is set here, in the master that loads this file
before it forks (the app is imported in each worker, after the fork, unless --preload: either
way after this), so prometheus-client sees it on import.  It is set for gunicorn's processes
only: Celery workers serve their own metrics, usually on other machines.

Not named gunicorn.conf.py, which gunicorn would load for every gunicorn started here (the
sandbox's too).  Every command-line flag keeps its meaning: gunicorn's command line wins over
a config file.  Module globals named like a gunicorn setting are read as settings (logging,
workers, bind below): everything else here starts with an underscore.
"""

from __future__ import annotations

import os as _os

from enrich import log_setup as _log_setup
from enrich.settings import Settings as _Settings

_settings = _Settings.from_env()

# gunicorn's own lines (its master's too) in LOG_FORMAT, with the app's redaction (log_setup).
logger_class = _log_setup.gunicorn_logger_class()
loglevel = _settings.log_level.lower()  # LOG_LEVEL, unless --log-level says otherwise
# WEB_WORKERS, HOST and PORT (or PROFILE's), unless -w / -b say otherwise.
workers = _settings.web_workers
bind = [f"{_settings.host}:{_settings.port}"]
# X-Forwarded-Proto counts only behind TRUSTED_PROXIES, through the app's ProxyFix (client_limits.py):
# gunicorn's own reading of it, from 127.0.0.1 by default, would let any local client choose the
# scheme the Origin check (origin_check.py) compares with.
forwarded_allow_ips = ""

_METRICS_DIR = _os.path.abspath(_settings.effective_metrics_dir)
_os.environ["PROMETHEUS_MULTIPROC_DIR"] = _METRICS_DIR
# Now too, not only in on_starting: importing the app creates files there (--check-config, --preload).
_os.makedirs(_METRICS_DIR, exist_ok=True)


def on_starting(server) -> None:
    """Before the first fork: drop a previous run's metrics files (they would add up).

    Only prometheus-client's own `*.db` files go: METRICS_DIR may be set to a directory that holds
    other things (DATA_DIR itself, with the embedded Redis's files).
    """
    _os.makedirs(_METRICS_DIR, exist_ok=True)
    for name in _os.listdir(_METRICS_DIR):
        if name.endswith(".db"):
            _os.remove(_os.path.join(_METRICS_DIR, name))


def child_exit(server, worker) -> None:
    """A worker exited: drop its files of live gauges (open streams, ...); its counters stay counted."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _METRICS_DIR)
