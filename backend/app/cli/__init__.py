"""The ``asa`` command: administration against the service's database (``DATABASE_URL``).

    asa keys create --user alice [--admin] [--name "alice's laptop"]   # prints the key once
    asa keys list [--json]
    asa keys revoke KEY_ID
    asa worker [--metrics-port PORT]   # runs queued tasks and the background jobs, no HTTP
    asa prices recompute [--since T] [--until T] [--model M] [--provider P] [--dry-run]
    asa notifications channels|subscriptions|dead-letters ...   # as /api/v1/notifications
    asa usage forecast|anomalies|recommendations [--user U | --everyone] [--json]

Each command group is a module of this package with ``register(groups)`` (adds its
sub-parser, setting ``handler``) and the handler ``(args, settings) -> exit status``. The
database is migrated first when ``AUTO_MIGRATE`` is on (the default), so the first key can be
created before the service has ever started.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.cli import keys, notifications, prices, usage, worker
from app.core.config import Settings, get_settings
from app.core.migrations import upgrade_to_head

# One entry per command group, in the order ``asa --help`` lists them.
GROUPS = (keys, worker, prices, notifications, usage)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asa", description="ASA administration.")
    groups = parser.add_subparsers(dest="group", required=True)
    for group in GROUPS:
        group.register(groups)
    return parser


def run(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    settings = settings or get_settings()
    if settings.auto_migrate:
        upgrade_to_head(settings.database_url)
    status: int = args.handler(args, settings)
    return status


def main() -> None:
    sys.exit(run())
