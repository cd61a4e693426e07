"""`flask cache|breakers|dead-letters|flags`: the admin API's operations on the command line."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from enrich import pipeline
from enrich.cli import watch
from enrich.cli.common import CACHED_TYPES, echo_json, json_option, needs_redis
from enrich.feature_flags import FLAGS
from enrich.identifiers import InvalidIdentifier, parse
from enrich.services import services

# -- cache ----------------------------------------------------------------------------------------

cache = AppGroup("cache", help="The versioned cache: stats and invalidation.")


@cache.command("stats")
@json_option
@needs_redis
def cache_stats(as_json: bool) -> None:
    """Hits, misses, hit rate, keys of the current generation, Redis memory."""
    stats = services().cache.stats()
    if as_json:
        return echo_json(stats)
    rate = f"{stats['hit_rate']:.1%}" if stats["hit_rate"] is not None else "-"
    click.echo(f"generation {stats['generation']} (schema v{stats['schema_version']}), {stats['keys']} keys")
    click.echo(f"hits {stats['hits']}, misses {stats['misses']}, stale {stats['stale']}, hit rate {rate}")
    click.echo(f"Redis memory {stats['used_memory_human']}")


@cache.command("invalidate")
@click.option("--type", "kind", type=click.Choice(CACHED_TYPES), help="Delete this type's entries.")
@click.option("--identifier", help="Only this identifier's entries (needs --type).")
@click.option("--all", "everything", is_flag=True, help="Every entry at once (a generation bump).")
@json_option
@needs_redis
def cache_invalidate(kind: str | None, identifier: str | None, everything: bool, as_json: bool) -> None:
    """Delete one identifier's entries, a whole type's, or everything (--all)."""
    store = services().cache
    if everything:
        if kind or identifier:
            raise click.BadParameter("--all takes no --type or --identifier", param_hint="'--all'")
        return _generation_bumped(store.bump_generation(), as_json)
    if kind is None:
        raise click.UsageError("give --type [--identifier], or --all")
    value = None
    if identifier is not None:
        try:
            value = parse(identifier, kind).value
        except InvalidIdentifier as error:
            raise click.BadParameter(error.message, param_hint="'--identifier'") from error
    deleted = store.invalidate(kind, value)
    if as_json:
        return echo_json({"deleted": deleted})
    click.echo(f"deleted {deleted} cache entries of {kind} {value or '(every identifier)'}")


@cache.command("bump-generation")
@json_option
@needs_redis
def cache_bump_generation(as_json: bool) -> None:
    """Invalidate every entry at once (old generations are swept by beat's cleanup)."""
    _generation_bumped(services().cache.bump_generation(), as_json)


def _generation_bumped(generation: int, as_json: bool) -> None:
    if as_json:
        return echo_json({"generation": generation})
    click.echo(f"cache generation is now {generation}: every entry before it is invalidated")


# -- breakers -------------------------------------------------------------------------------------

breakers = AppGroup("breakers", help="The circuit breaker of each source, shared by every process.")


def _breaker_line(status: dict) -> str:
    opened = f"opened {watch.clock(status['opened_at'])}" if status["opened_at"] else ""
    return (
        f"{status['name']:<10} {status['state']:<10} failures {status['failures']}/{status['fail_max']}  "
        f"reset after {status['reset_timeout']:g} s  {opened}"
    ).rstrip()


@breakers.command("list")
@json_option
@needs_redis
def breakers_list(as_json: bool) -> None:
    """Every source's breaker: state, failures, when it opened."""
    statuses = {name: status.to_dict() for name, status in services().breakers.status_all().items()}
    if as_json:
        return echo_json(statuses)
    for status in statuses.values():
        click.echo(_breaker_line(status))


def _change_breaker(source: str, action: str, as_json: bool) -> None:
    known = services().settings.sources
    if source not in known:
        raise click.BadParameter(
            f"no source named {source!r} (sources: {', '.join(known)})", param_hint="'SOURCE'"
        )
    manager = services().breakers
    if action == "reset":
        manager.reset(source)
    else:
        manager.force_open(source)
    status = manager.status(source).to_dict()
    if as_json:
        return echo_json(status)
    click.echo(_breaker_line(status))


@breakers.command("reset")
@click.argument("source")
@json_option
@needs_redis
def breakers_reset(source: str, as_json: bool) -> None:
    """Close a source's breaker and zero its counters."""
    _change_breaker(source, "reset", as_json)


@breakers.command("open")
@click.argument("source")
@json_option
@needs_redis
def breakers_open(source: str, as_json: bool) -> None:
    """Open a source's breaker now (it half-opens after its reset timeout as usual)."""
    _change_breaker(source, "open", as_json)


# -- dead letters ---------------------------------------------------------------------------------

dead_letters_group = AppGroup("dead-letters", help="Source calls that failed after every retry.")


@dead_letters_group.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@json_option
@needs_redis
def dead_letters_list(limit: int, as_json: bool) -> None:
    """The newest dead letters."""
    letters = services().dead_letters
    count, items = letters.count(), letters.list(limit)
    if as_json:
        return echo_json({"count": count, "items": items})
    click.echo(f"{count} dead letters" + (f", newest {len(items)}:" if items else ""))
    for item in items:
        click.echo(
            f"{item['id']}  {watch.clock(item['failed_at'])}  {item['source']:<10} {item['type']} "
            f"{item['identifier']}  attempts {item['attempts']}  {item['error']}"
        )


@dead_letters_group.command("requeue")
@click.argument("entry_id", metavar="ID")
@json_option
@needs_redis
def dead_letters_requeue(entry_id: str, as_json: bool) -> None:
    """Send a dead letter's call again as a new task."""
    requeued = pipeline.requeue_dead_letter(services(), entry_id)
    if requeued is None:
        raise click.ClickException(f"no dead letter with id {entry_id!r}")
    if as_json:
        return echo_json(requeued)
    click.echo(
        f"requeued {entry_id}: {requeued['source']} for {requeued['type']} {requeued['identifier']} "
        f"as task {requeued['task_id']}"
    )


# -- feature flags --------------------------------------------------------------------------------

flags = AppGroup("flags", help="Feature flags, in force in every process without a restart.")
FLAG_VALUES = {"on": True, "off": False, "default": None}


def _flag_line(name: str, flag: dict) -> str:
    origin = "set at run time" if flag["source"] == "redis" else "from settings"
    return f"{name:<16} {'on' if flag['enabled'] else 'off':<4} {origin} (default {'on' if flag['default'] else 'off'})"


@flags.command("list")
@json_option
@needs_redis
def flags_list(as_json: bool) -> None:
    """Every flag: on or off, and whether a run-time value or the setting decides."""
    values = services().flags.all()
    if as_json:
        return echo_json(values)
    for name, flag in values.items():
        click.echo(_flag_line(name, flag))


@flags.command("set")
@click.argument("name", type=click.Choice(list(FLAGS)))
@click.argument("value", type=click.Choice(list(FLAG_VALUES)))
@json_option
@needs_redis
def flags_set(name: str, value: str, as_json: bool) -> None:
    """Turn a flag on or off for the whole cluster, or back to its setting (default)."""
    flag = services().flags.set(name, FLAG_VALUES[value])
    if as_json:
        return echo_json({"name": name, **flag})
    click.echo(_flag_line(name, flag))


GROUPS = (cache, breakers, dead_letters_group, flags)
