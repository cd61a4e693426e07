"""Process logging: one stderr handler (text or JSON lines), the lookup context on each record, redaction."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonFormatter

from enrich.log_redaction import redact, redact_values
from enrich.settings import Settings

# Fields that follow one lookup across processes, in the order they are printed.
CONTEXT_FIELDS = ("lookup_id", "source", "task_id", "task_name")
_TEXT_NAMES = {"lookup_id": "lookup", "source": "source", "task_id": "task", "task_name": None}
_context = {name: contextvars.ContextVar(f"log_{name}", default=None) for name in CONTEXT_FIELDS}
GUNICORN_LOGGERS = ("gunicorn.error", "gunicorn.access")
# gunicorn's access-log atoms, as fields of an access line's "http" object in JSON.
_ACCESS_ATOMS = {"method": "m", "path": "U", "status": "s", "duration_us": "D", "bytes": "B", "remote": "h"}

Function = TypeVar("Function", bound=Callable[..., Any])


# -- context -------------------------------------------------------------------------------


def set_context(**fields: str | None) -> dict[str, contextvars.Token]:
    """Bind log fields in the current context; returns the tokens for `reset_context`."""
    return {name: _context[name].set(value) for name, value in fields.items()}


def reset_context(tokens: dict[str, contextvars.Token]) -> None:
    """Undo a `set_context`."""
    for name, token in tokens.items():
        _context[name].reset(token)


@contextlib.contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Bind log fields (lookup_id, source, task_id, task_name) while the block runs; None ones are skipped."""
    tokens = set_context(**{name: value for name, value in fields.items() if value is not None})
    try:
        yield
    finally:
        reset_context(tokens)


def current_context() -> dict[str, str]:
    """The fields bound here now."""
    return {name: value for name, var in _context.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (a field given with `extra=` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


# -- formats -------------------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """For people: `2026-07-01 12:00:00.123Z INFO    worker pipeline: message lookup=… source=… task=…`."""

    converter = time.gmtime
    default_msec_format = "%s.%03dZ"

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-7s {process} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # Redacted piece by piece: a header's value runs to the end of its line, and the
        # context suffix must survive that.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = redact(self.formatMessage(record)) + "".join(
            f" {label}={value}"
            for name, label in _TEXT_NAMES.items()
            if label and (value := getattr(record, name, None)) is not None
        )
        if record.exc_info or record.exc_text:
            text += "\n" + redact(record.exc_text or self.formatException(record.exc_info))
        if record.stack_info:
            text += "\n" + redact(self.formatStack(record.stack_info))
        return text


class JsonLogFormatter(JsonFormatter):
    """For collectors: one JSON object a line (time, level, logger, message, process, pid, context, extras)."""

    def __init__(self, process: str) -> None:
        super().__init__(
            reserved_attrs=[*RESERVED_ATTRS, "taskName", *CONTEXT_FIELDS], json_ensure_ascii=False
        )
        self.process_kind = process

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data["process"] = self.process_kind
        log_data["pid"] = record.process
        for name in CONTEXT_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                log_data[name] = value
        if record.name == "gunicorn.access" and isinstance(record.args, dict):
            log_data["http"] = {field: record.args.get(atom) for field, atom in _ACCESS_ATOMS.items()}
        log_data.update(message_dict)  # exc_info and stack_info as strings, or a dict logged as the message
        merge_record_extra(record, log_data, reserved=self._skip_fields)  # fields given with `extra=`

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return redact_values(log_data)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest swaps it per test; a bound one goes stale)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def formatter(settings: Settings, process: str) -> logging.Formatter:
    """The formatter of LOG_FORMAT for this process kind (web, worker, beat)."""
    return JsonLogFormatter(process) if settings.log_format == "json" else TextFormatter(process)


def adopt(handler: logging.Handler, settings: Settings, process: str) -> None:
    """Give a handler (ours, or a library's) the service's format, context and redaction.

    Both formatters redact everything they print (message, arguments, traceback, fields), so no
    filter redacts the record itself first.
    """
    handler.setFormatter(formatter(settings, process))
    if not any(isinstance(existing, ContextFilter) for existing in handler.filters):
        handler.addFilter(ContextFilter())


# -- setup ---------------------------------------------------------------------------------


def _level(name: str | int | None) -> int:
    if isinstance(name, int):
        return name
    value = logging.getLevelName(str(name or "INFO").upper())
    return value if isinstance(value, int) else logging.INFO


_configured: dict[str, Any] = {"process": None, "level": None}


def configured_process() -> str | None:
    """The process kind logging was configured for here (None before `configure`)."""
    return _configured["process"]


def configure(settings: Settings, process: str, level: str | int | None = None) -> logging.Handler:
    """Install (or refresh) the one stderr handler of ours on the root logger; returns it.

    Idempotent: the app factory runs many times in one test process; other handlers on the
    root logger (pytest's caplog) are left alone.  `level`: a more verbose level asked for on
    a command line (Celery's --loglevel) wins over LOG_LEVEL, and is kept by later calls.
    """
    redact.learn(settings)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_log_setup", False)), None)
    if handler is None:
        handler = StderrHandler()
        handler._log_setup = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    adopt(handler, settings, process)
    _configured["process"] = process
    if level is not None:
        _configured["level"] = _level(level)
    wanted = _level(settings.log_level)
    root.setLevel(min(wanted, _configured["level"]) if _configured["level"] is not None else wanted)
    if settings.log_format == "json":
        logging.captureWarnings(True)  # warnings become JSON records too, not stray lines on stderr
    if process == "web":
        adopt_gunicorn(settings)
    return handler


def adopt_gunicorn(settings: Settings) -> None:
    """gunicorn's own loggers (they do not propagate) print in the same format, in master and workers."""
    for name in GUNICORN_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            adopt(handler, settings, "web")


def gunicorn_logger_class() -> type:
    """A gunicorn `logger_class` that prints gunicorn's lines (the master's too) in LOG_FORMAT."""
    from gunicorn.glogging import Logger  # only gunicorn processes need it

    class ServiceLogger(Logger):
        def setup(self, cfg) -> None:
            super().setup(cfg)
            adopt_gunicorn(Settings.from_env())

    return ServiceLogger


# -- Celery --------------------------------------------------------------------------------

_task_tokens: dict[str, dict[str, contextvars.Token]] = {}
_task_signatures: dict[str, inspect.Signature] = {}


def bind_task(
    task_id: str | None = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    """task_prerun: bind the task's id and name, and its lookup_id / source arguments when it has them."""
    name = getattr(task, "name", None)
    fields: dict[str, Any] = {"task_id": task_id, "task_name": name, "lookup_id": None, "source": None}
    try:
        payload = getattr(task, "payload", None)  # a task whose arguments are a payload class's fields
        if payload is not None:
            arguments = vars(payload(*(args or ()), **(kwargs or {})))
        else:
            signature = _task_signatures.get(name) or _task_signatures.setdefault(
                name, inspect.signature(task.run)
            )
            arguments = signature.bind_partial(*(args or ()), **(kwargs or {})).arguments
    except (TypeError, ValueError):
        arguments = {}
    for field in ("lookup_id", "source"):
        if isinstance(arguments.get(field), str):
            fields[field] = arguments[field]
    # Every field is set (None where absent), so postrun's reset also undoes what the task bound.
    _task_tokens[task_id] = set_context(**fields)


def unbind_task(task_id: str | None = None, **_: Any) -> None:
    """task_postrun: undo `bind_task`."""
    tokens = _task_tokens.pop(task_id, None)
    if tokens is not None:
        with contextlib.suppress(ValueError):  # set in another context (cannot happen with a thread pool)
            reset_context(tokens)


def celery_process_kind() -> str:
    """worker or beat: the celery subcommand running this process."""
    import click

    context = click.get_current_context(silent=True)
    return "beat" if context is not None and context.info_name == "beat" else "worker"


def connect_celery(get_settings: Callable[[], Settings]) -> None:
    """Own the logging of `celery worker|beat` (Celery then configures none) and bind task context."""
    from celery import signals

    def setup_logging(loglevel: int | None = None, **_: Any) -> None:
        configure(get_settings(), celery_process_kind(), level=loglevel)

    def worker_init(**_: Any) -> None:
        # Earlier than setup_logging: Celery's privilege check warns (as root) in between.
        configure(get_settings(), "worker")

    signals.celeryd_init.connect(worker_init, weak=False)
    signals.setup_logging.connect(setup_logging, weak=False)
    signals.task_prerun.connect(bind_task, weak=False)
    signals.task_postrun.connect(unbind_task, weak=False)
