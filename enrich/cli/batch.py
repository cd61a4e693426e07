"""`flask batch run|status|cancel|results`: bulk batches on the command line, without the HTTP API.

`run` reads a CSV (or a JSON list) the way `POST /api/batches` does (batches/input.py), creates
the batch in this process, follows it with a progress bar and writes its results with the API's
own row serializers (batch_rows.csv_lines / jsonl_lines).  Like `flask lookup`, it only creates
and watches: the items are looked up by the Celery workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import click
import orjson
from flask.cli import AppGroup

from enrich import cpf_answers, maintenance
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.batches.runner import BatchRunner
from enrich.batches.store import BatchStore
from enrich.cli.common import echo_json, json_option, needs_redis
from enrich.cli.watch import clock
from enrich.identifiers import IdentifierType
from enrich.services import services

# A status read is a few round trips; twice a second keeps the bar lively at no cost to Redis.
POLL_INTERVAL = 0.5
NOT_FOUND = "no batch with id {!r} (unknown or expired)"
WORKER_NOTE = (
    "The items are looked up by the Celery workers: one must be running (celery -A job_queue worker)."
)

batch = AppGroup("batch", help=f"Bulk batches: run a file of identifiers, follow, cancel.  {WORKER_NOTE}")


def _store() -> BatchStore:
    return services().batches


def _runner() -> BatchRunner:
    return services().batch_runner


def _read_status(batch_id: str) -> dict | None:
    """The batch's status; as when the API reads it, a batch whose steps stopped gets one."""
    return _runner().shown_status(batch_id)


def _stderr(line: str) -> None:
    click.echo(line, err=True)


def read_batch(path: str, max_bytes: int, max_rows: int) -> batch_input.ParsedBatch:
    """The file's batch: JSON when it is named *.json or starts with `[`/`{`, else CSV.

    The same limits as `POST /api/batches` (BATCH_MAX_BYTES, BATCH_MAX_ROWS): a batch the API
    would refuse is refused here too.
    """
    with click.open_file(path, "rb") as source:
        raw = source.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise batch_input.BatchRejected(f"the file is larger than BATCH_MAX_BYTES ({max_bytes:,} bytes)")
    text = batch_input.decode(raw)
    if not (path.lower().endswith(".json") or text.lstrip().startswith(("[", "{"))):
        return batch_input.parse_csv(text, max_rows)
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise batch_input.BatchRejected(f"the file is not JSON: {error}") from error
    if isinstance(items, dict) and "identifiers" in items:  # the body of POST /api/batches
        items = items["identifiers"]
    return batch_input.parse_json(items, max_rows)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if 0 < seconds < 1:
        return "< 1 s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def counts_text(status: dict) -> str:
    """`12 found, 3 not_found, 8 running`: the states that hold any item, in ITEM_STATES order."""
    return ", ".join(f"{n} {state}" for state, n in status["counts"].items() if n) or "no items"


def progress_suffix(status: dict | None) -> str | None:
    if status is None:
        return None
    if status["finished_at"] is not None:
        return counts_text(status)
    return f"{counts_text(status)}  ETA {duration(status['eta_seconds'])}"


def summary_line(status: dict) -> str:
    """`complete: 12 lines, 10 items (...): 7 found, ... in 4 s (batch ID)`."""
    took = (status["finished_at"] or time.time()) - status["created_at"]
    return (
        f"{status['status']}: {status['lines']} lines, {status['total']} items ({status['cached']} cached, "
        f"{status['duplicates']} duplicate lines, {status['invalid_lines']} invalid lines): "
        f"{counts_text(status)} in {duration(took)} (batch {status['id']})"
    )


def follow(batch_id: str, status: dict, timeout: float | None) -> tuple[dict, bool]:
    """Poll the batch until it is finished or `timeout` seconds pass, drawing a bar on stderr;
    returns (status, timed_out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = click.progressbar(
        length=status["total"],
        label=f"batch {batch_id}: {status['total']} items",
        show_pos=True,
        show_eta=False,  # the batch's own ETA (rate limits and measured pace) is in the suffix
        item_show_func=progress_suffix,
        file=click.get_text_stream("stderr"),
    )
    with bar:
        bar.update(status["done"], status)
        while status["finished_at"] is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return status, True
            time.sleep(POLL_INTERVAL if left is None else min(POLL_INTERVAL, left))
            latest = _read_status(batch_id)
            if latest is None:
                raise click.ClickException(f"batch {batch_id} vanished (expired or cleaned up)")
            status = latest
            step = status["done"] - bar.pos
            bar.update(step, status)
            if not step:
                bar.render_progress()  # the counts and the ETA change between items done too
    return status, False


def write_results(batch_id: str, output: str, fmt: str) -> None:
    """The results, one row per input line, to `output` (`-`: stdout); a file appears whole or not at all."""
    rows = _store().rows(batch_id)
    chunks: Iterator[str | bytes] = (
        batch_rows.csv_lines(rows) if fmt == "csv" else batch_rows.jsonl_lines(rows)
    )
    try:
        with click.open_file(output, "wb", atomic=output != "-") as out:
            for chunk in chunks:
                out.write(chunk.encode() if isinstance(chunk, str) else chunk)
    except OSError as error:
        raise click.ClickException(f"cannot write {output}: {error.strerror or error}") from error


def _cancelled_line(status: dict) -> str:
    running = status["counts"]["running"]
    return (
        f"cancelled batch {status['id']}: {status['counts']['cancelled']} items not started are cancelled"
        + (f", {running} in flight finish" if running else "")
    )


format_option = click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True
)
output_option = click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default="-",
    show_default=True,
    help="Where the results go (- is stdout).",
)


@batch.command("run", epilog=WORKER_NOTE)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--name", help="The batch's name (default: the file's name).")
@output_option
@format_option
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    help="Give up watching after this many seconds (exit 1); the batch carries on.",
)
@needs_redis
def batch_run(file: str, name: str | None, output: str, fmt: str, timeout: float | None) -> None:
    """Create a batch from FILE (CSV, or a JSON list; - is stdin), follow it, write its results.

    Invalid rows are listed on stderr and answered as `invalid` rows in the results, and so is the
    batch's cancel token (what `DELETE /api/batches/ID` needs in X-Cancel-Token; `flask batch
    cancel` needs none).  Exit 0 when the batch completes (even with failed or not_found rows),
    1 when it was cancelled or on --timeout, 130 on Ctrl-C, which cancels the items not started yet.
    """
    settings = services().settings
    if output != "-" and not os.access(os.path.dirname(os.path.abspath(output)), os.W_OK):
        # Checked now, not after a batch of an hour: the results would have nowhere to go.
        raise click.BadParameter(f"cannot write in the directory of {output!r}", param_hint="'--output'")
    try:
        parsed = read_batch(file, settings.batch_max_bytes, settings.batch_max_rows)
    except batch_input.BatchRejected as error:
        raise click.BadParameter(str(error), param_hint="'FILE'") from error
    if not parsed.lines:
        raise click.BadParameter("the file holds no identifiers", param_hint="'FILE'")
    looked_up = [identifier for identifier in parsed.unique if identifier.type is not IdentifierType.CPF]
    if looked_up and not maintenance.live_workers(services()):  # a CPF needs no worker (cpf_answers.py)
        raise click.ClickException("no live worker to run the batch (start one: celery -A job_queue worker)")
    for entry in parsed.invalid:
        # Masked as the batch keeps it: an unreadable line may still hold a person's CPF.
        value, reason = (cpf_answers.mask_digit_runs(text) for text in (entry.value, entry.reason))
        _stderr(f"line {entry.line}: {value}: {reason}")
    default_name = "" if file == "-" else os.path.basename(file)
    status = _runner().create(parsed, default_name if name is None else name)
    batch_id = status["id"]
    # Shown once, like the API's 202: whoever else is given the id can watch the batch, not cancel it.
    _stderr(
        f"batch {batch_id}: cancel token {status['cancel_token']} "
        f"(DELETE /api/batches/{batch_id} with the header X-Cancel-Token)"
    )
    try:
        status, timed_out = follow(batch_id, status, timeout)
    except KeyboardInterrupt:
        # Ctrl-C means "stop this": the items not started are cancelled, those in flight finish.
        if _runner().cancel(batch_id) == "complete":
            _stderr(f"batch {batch_id} completed before the cancel (flask batch results {batch_id})")
        else:
            _stderr(_cancelled_line(_read_status(batch_id) or status))
        raise click.exceptions.Exit(130) from None
    if timed_out:
        raise click.ClickException(
            f"timed out after {timeout:g} s with {status['done']}/{status['total']} items done; "
            f"batch {batch_id} carries on (flask batch status|results {batch_id})"
        )
    write_results(batch_id, output, fmt)
    _stderr(summary_line(status))
    if status["status"] == "cancelled":
        raise click.ClickException(f"batch {batch_id} was cancelled")


def _status_or_fail(batch_id: str) -> dict:
    status = _read_status(batch_id)
    if status is None:
        raise click.ClickException(NOT_FOUND.format(batch_id))
    return status


@batch.command("status", epilog=WORKER_NOTE)
@click.argument("batch_id", metavar="ID")
@json_option
@needs_redis
def batch_status(batch_id: str, as_json: bool) -> None:
    """A batch's state, counts by state and ETA."""
    status = _status_or_fail(batch_id)
    if as_json:
        return echo_json(status)
    named = f" ({status['name']})" if status["name"] else ""
    click.echo(f"batch {batch_id}{named} {status['status']}: {status['done']}/{status['total']} items done")
    click.echo(f"items  {counts_text(status)}")
    click.echo(
        f"lines  {status['lines']} ({status['invalid_lines']} invalid, {status['duplicates']} duplicates), "
        f"{status['cached']} items answered from the cache"
    )
    times = [f"created {clock(status['created_at'])}"]
    if status["cancelled_at"]:
        times.append(f"cancelled {clock(status['cancelled_at'])}")
    if status["finished_at"]:
        times.append(f"finished {clock(status['finished_at'])}")
    else:
        pace = status["throughput_per_second"]
        times.append(f"ETA {duration(status['eta_seconds'])}" + (f" at {pace:g} items/s" if pace else ""))
    click.echo("times  " + ", ".join(times))


@batch.command("cancel")
@click.argument("batch_id", metavar="ID")
@json_option
@needs_redis
def batch_cancel(batch_id: str, as_json: bool) -> None:
    """Cancel the items not started yet (those in flight finish).

    Exit 1 when the batch is already complete (nothing is left to cancel).
    """
    outcome = _runner().cancel(batch_id) if len(batch_id) <= 64 else None
    if outcome is None:
        raise click.ClickException(NOT_FOUND.format(batch_id))
    if outcome == "complete":
        raise click.ClickException(f"batch {batch_id} is already complete; nothing is left to cancel")
    status = _status_or_fail(batch_id)
    if as_json:
        return echo_json(status)
    click.echo(_cancelled_line(status))


@batch.command("results")
@click.argument("batch_id", metavar="ID")
@output_option
@format_option
@needs_redis
def batch_results(batch_id: str, output: str, fmt: str) -> None:
    """A batch's results so far, one row per input line.

    The rows of GET /api/batches/ID/results: pending and running rows have no fields yet.
    """
    if not _store().exists(batch_id):
        raise click.ClickException(NOT_FOUND.format(batch_id))
    write_results(batch_id, output, fmt)
