"""The `flask` command line: lookups, queues and health (commands), the admin twins (admin),
batches (batch); `common` holds what they share.

Registered on the app by `init_app`, so `flask --app app <command>` finds them.  Exit codes:
0 done, 1 a failed lookup or check (or Redis unreachable), 2 a usage error (click's own).
"""

from __future__ import annotations

from flask import Flask

from enrich.cli import admin, batch, commands


def init_app(app: Flask) -> None:
    """Register the commands on the app's `flask` command line."""
    for command in (commands.lookup, commands.queue, commands.health, *admin.GROUPS, batch.batch):
        app.cli.add_command(command)
