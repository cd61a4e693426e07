"""A worker process's threads for the source calls of one lookup task, and its CEP fetches in flight.

One Celery task per lookup (not one per source) calls all of the lookup's sources at once on
these threads: each Celery task costs about 2 ms of CPU across web, broker and worker, which
was most of an uncached lookup's cost when every source had one.  A call that has to wait (a
token, a retry) still leaves as a task of its own, so no thread here ever sleeps for a quota.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()
_lock = threading.Lock()  # for _cep_fetches
# CEP -> the fetch of it running in this process (a company's CEP, fetched for the cross-check
# as soon as the first company source names it, while the others are still answering).
_cep_fetches: dict[str, Future] = {}


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # threads do not survive fork()
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="source-call")
            _pool_pid = os.getpid()
        return _pool


def submit(size: int, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """Run `function(*args, **kwargs)` on a pool thread (the pool sized `size` when first made).

    It runs in a copy of the caller's context variables (pool threads do not inherit them), so
    its log lines carry the caller's lookup and task (log_setup); what it binds stays its own.
    The functions are handed the app's parts: no app context is needed.
    """
    context = contextvars.copy_context()
    return _executor(size).submit(context.run, function, *args, **kwargs)


def start_cep_fetch(cep: str, start: Callable[[], Future]) -> None:
    """Start `start()` for this CEP unless a fetch of it is already running in this process."""
    with _lock:
        running = _cep_fetches.get(cep)
        if running is not None and not running.done():
            return
        future = _cep_fetches[cep] = start()
    future.add_done_callback(lambda done: _forget(cep, done))


def _forget(cep: str, future: Future) -> None:
    with _lock:
        if _cep_fetches.get(cep) is future:
            del _cep_fetches[cep]


def wait_for_cep_fetch(cep: str, timeout: float) -> None:
    """Wait (up to `timeout`) for this process's fetch of `cep`, if one is running; never raises."""
    with _lock:
        running = _cep_fetches.get(cep)
    if running is not None:
        try:
            running.result(timeout=timeout)
        except Exception:  # noqa: BLE001 - its outcome is read from the cache; a failure is a miss there
            pass
