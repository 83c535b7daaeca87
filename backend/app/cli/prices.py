"""``asa prices``: reprice past usage rows with the current prices, and list past runs.

    asa prices recompute [--since 2026-11-01] [--until 2026-12-01] [--model M] [--provider P]
                         [--dry-run] [--json]
    asa prices runs [--json]

The prices are this command's settings: ``PRICES_FILE`` and ``PRICE_OVERRIDES`` (set them as the
service has them, or to the newer prices to apply). Rows, rollups, task metrics and budget
counters move together, one transaction per batch, safely beside a running service; each run
is kept as an audit record (``asa prices runs``, ``GET /api/v1/admin/prices/recompute``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import datetime

from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.errors import AppError
from app.prices import audit
from app.prices.recompute import recompute_prices
from app.schemas.prices import RecomputeRun
from app.tracking.price_table import PriceFileError
from app.tracking.pricing import PriceBook


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = groups.add_parser("prices", help="price provenance and recompute")
    group.set_defaults(handler=run)
    commands = group.add_subparsers(dest="command", required=True)

    recompute = commands.add_parser(
        "recompute", help="reprice rows from their token counts with the current prices"
    )
    recompute.add_argument("--since", type=_moment, help="ISO 8601, inclusive (naive: UTC)")
    recompute.add_argument("--until", type=_moment, help="ISO 8601, exclusive (default: now)")
    recompute.add_argument("--model", help="only rows of this model")
    recompute.add_argument("--provider", help="only rows of this provider (gen_ai.provider.name)")
    recompute.add_argument(
        "--dry-run", action="store_true", help="change nothing; show the totals before and after"
    )
    recompute.add_argument("--json", action="store_true", help="print the audit record as JSON")

    runs = commands.add_parser("runs", help="list the latest recompute runs")
    runs.add_argument("--json", action="store_true", help="print JSON")


def _moment(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {value!r}") from exc


def _summary(run: RecomputeRun) -> list[str]:
    verb = "would change" if run.dry_run else "changed"
    return [
        f"run {run.id} ({'dry run' if run.dry_run else 'applied'}): {run.status}",
        f"rows examined {run.rows_examined}, {verb} {run.rows_changed}",
        f"cost before {run.cost_before_usd:f} USD, after {run.cost_after_usd:f} USD "
        f"(delta {run.cost_delta_usd:f})",
        f"unpriced rows before {run.unpriced_before}, after {run.unpriced_after}",
        f"price sources before {json.dumps(run.sources_before)}, "
        f"after {json.dumps(run.sources_after)}",
    ]


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``prices`` command; returns the exit status."""
    try:
        book = PriceBook.configured(settings.price_overrides, settings.prices_file)
    except PriceFileError as exc:
        print(f"asa: {exc}", file=sys.stderr)
        return 2
    engine = create_db_engine(
        settings.database_url, sqlite_busy_timeout=settings.sqlite_busy_timeout_seconds
    )
    try:
        if args.command == "recompute":
            scope = audit.scope_of(args.since, args.until, args.model, args.provider)
            run_id = recompute_prices(
                engine, book, scope, actor=f"cli:{getpass.getuser()}", dry_run=args.dry_run
            )
            with transaction(create_session_factory(engine)) as session:
                shown = [audit.get_run(session, run_id)]
        else:
            with transaction(create_session_factory(engine)) as session:
                shown = audit.list_runs(session)
    except AppError as exc:
        print(f"asa: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if args.json:
        payload = [r.model_dump(mode="json") for r in shown]
        print(json.dumps(payload[0] if args.command == "recompute" else payload))
    else:
        for item in shown:
            print("\n".join(_summary(item)))
    return 0
