"""What every `flask` command shares: Redis checked first and its failure as one line, JSON output."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import redis

from circuit_breaker_manager import BreakerUnavailable
from enrich.services import services

IDENTIFIER_TYPES = ("cnpj", "cep", "cpf")
CACHED_TYPES = ("cnpj", "cep")  # a CPF is never cached (cpf_answers.py)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def shown_redis_url() -> str:
    """The Redis URL with any password left out (it ends up in terminals and CI logs)."""
    parts = urlsplit(services().settings.effective_redis_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))


def needs_redis(command: Callable[..., Any]) -> Callable[..., Any]:
    """Ping Redis first and turn a Redis failure anywhere in the command into one line and exit 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            # Some reads degrade quietly when Redis is away (flags keep their last values, a cache
            # read is a miss): a command must say so instead of printing defaults as the truth.
            services().redis.ping()
            return command(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, BreakerUnavailable) as error:
            raise click.ClickException(f"Redis unreachable at {shown_redis_url()}") from error
        except redis.RedisError as error:
            raise click.ClickException(f"Redis error at {shown_redis_url()}: {error}") from error

    return run


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
