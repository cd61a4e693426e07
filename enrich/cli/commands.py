"""The lookup, queue and health commands (`flask lookup|queue|health`)."""

from __future__ import annotations

import time
from typing import Any

import click
import redis
from flask.cli import AppGroup, with_appcontext

from circuit_breaker_manager import BreakerUnavailable
from enrich import maintenance, pipeline
from enrich.cli import watch
from enrich.cli.common import IDENTIFIER_TYPES, echo_json, json_option, needs_redis, shown_redis_url
from enrich.identifiers import IdentifierType, InvalidIdentifier, parse
from enrich.lookups import SourceResult
from enrich.services import services

# -- lookup -------------------------------------------------------------------------------------


@click.command("lookup")
@click.argument("identifier")
@click.option(
    "--type", "kind", type=click.Choice(IDENTIFIER_TYPES), help="Identifier type (default: detected)."
)
@click.option("--priority", type=click.IntRange(1, 10), default=5, show_default=True, help="10 most urgent.")
@click.option("--refresh", is_flag=True, help="Skip the cache read and rewrite the entries.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True)
@json_option
@with_appcontext
@needs_redis
def lookup(identifier: str, kind: str | None, priority: int, refresh: bool, timeout: float, as_json: bool):
    """Look an identifier up and watch its sources settle."""
    try:
        parsed = parse(identifier, kind)
    except InvalidIdentifier as error:
        hint = "'--type'" if error.field == "type" else "'IDENTIFIER'"
        raise click.BadParameter(error.message, param_hint=hint) from error
    if parsed.type is IdentifierType.CPF:
        # From the number alone, here: no worker, no record, nothing in Redis (cpf_answers.py).
        answer, _ = pipeline.start_lookup(services(), parsed, priority, refresh)
        if as_json:
            echo_json(answer.to_dict())
            return
        for line in watch.summary_lines(answer):
            click.echo(line)
        return
    if not maintenance.live_workers(services()) and (
        refresh or not watch.fully_cached(parsed, services().cache, services().sources)
    ):
        raise click.ClickException(
            "no live worker to run the lookup (start one: celery -A job_queue worker); "
            "only an answer fully in the cache works without one"
        )
    started, created = pipeline.start_lookup(services(), parsed, priority, refresh)
    on_terminal = not as_json and click.get_text_stream("stdout").isatty()

    def say(line: str) -> None:
        if not as_json:
            # On a terminal the bar owns the last line: wipe it, print, and the bar redraws below.
            click.echo(("\r\033[K" if on_terminal else "") + line)

    if not created:
        say(f"joined the lookup already running for this identifier ({started.id})")
    label = f"lookup {parsed.type} {parsed.value}"
    with click.progressbar(length=len(started.sources), label=label, show_pos=True, hidden=as_json) as bar:

        def settled(result: SourceResult, done: int, total: int) -> None:
            say(watch.source_line(result, done, total))
            bar.update(1)

        try:
            final, timed_out = watch.follow(services().lookups, started.id, timeout, settled, say)
        except watch.LookupGone as error:
            raise click.ClickException(f"lookup {started.id} vanished (expired or cleaned up)") from error
    if as_json:
        echo_json(final.to_dict())
    else:
        for line in watch.summary_lines(final):
            click.echo(line)
    if timed_out:
        raise click.ClickException(
            f"timed out after {timeout:g} s with {final.done}/{len(final.sources)} sources settled; "
            f"still waiting for {', '.join(watch.unsettled(final))} (lookup {final.id} carries on)"
        )


# -- queue and health -----------------------------------------------------------------------------

queue = AppGroup("queue", help="The broker's queues and the workers.")


@queue.command("stats")
@json_option
@needs_redis
def queue_stats(as_json: bool) -> None:
    """Messages waiting per priority, deferred calls, live workers."""
    depths = maintenance.queue_depths(services())
    stats = {
        "by_priority": depths,
        "deferred": services().deferred.pending(),
        "workers": maintenance.live_workers(services()),
    }
    if as_json:
        return echo_json(stats)
    levels = " ".join(f"{priority}:{depth}" for priority, depth in depths.items())
    click.echo(f"queued {sum(depths.values())} by priority (10 most urgent) {levels}")
    click.echo(f"deferred {stats['deferred']} (waiting for a rate limit or a retry)")
    click.echo(
        f"workers {len(stats['workers'])} live"
        + (f": {', '.join(stats['workers'])}" if stats["workers"] else "")
    )


@click.command("health")
@click.option("--strict", is_flag=True, help="Also fail while a breaker is not closed.")
@json_option
@with_appcontext
def health(strict: bool, as_json: bool) -> None:
    """Redis and a live worker (as /readyz), and the breakers; exit 1 when not ready."""
    report: dict[str, Any] = {"ready": False, "redis": False, "redis_latency_ms": None, "workers": []}
    report.update(breakers={}, problems=[], warnings=[])
    try:
        started = time.perf_counter()
        services().redis.ping()
        report.update(redis=True, redis_latency_ms=round((time.perf_counter() - started) * 1000, 2))
        report["workers"] = maintenance.live_workers(services())
        report["breakers"] = {name: s.to_dict() for name, s in services().breakers.status_all().items()}
    except (redis.RedisError, BreakerUnavailable):
        report["redis"] = False
        report["problems"].append(f"Redis unreachable at {shown_redis_url()}")
    if report["redis"] and not report["workers"]:
        report["problems"].append("no live worker")
    not_closed = [
        f"breaker {name} is {b['state']}" for name, b in report["breakers"].items() if b["state"] != "closed"
    ]
    report["problems" if strict else "warnings"].extend(not_closed)
    report["ready"] = not report["problems"]
    if as_json:
        echo_json(report)
    elif not report["redis"]:
        raise click.ClickException(report["problems"][0])
    else:
        workers = ", ".join(report["workers"]) or "none"
        click.echo(f"redis     ok in {report['redis_latency_ms']} ms at {shown_redis_url()}")
        click.echo(f"workers   {workers}")
        click.echo("breakers  " + ", ".join(f"{name} {b['state']}" for name, b in report["breakers"].items()))
        for warning in report["warnings"]:
            click.echo(f"warning: {warning}")
        click.echo("ready" if report["ready"] else f"not ready: {'; '.join(report['problems'])}")
    if not report["ready"]:
        raise click.exceptions.Exit(1)
