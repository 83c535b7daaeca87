"""``asa keys``: issue, list and revoke API keys.

    asa keys create --user alice [--admin] [--name "alice's laptop"]   # prints the key once
                    [--allow-model gpt-4o-mini ...] [--budget-usd 25]
    asa keys list [--json]
    asa keys limit KEY_ID [--allow-model M ... | --any-model] [--budget-usd X | --no-budget]
    asa keys revoke KEY_ID

``--allow-model`` (repeatable) limits the models a key may call through the gateway (/v1);
``--budget-usd`` gives it a budget of its own, over its whole life (docs/GATEWAY.md).

A running service notices a new key, or a revocation, within a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation

from sqlalchemy.orm import Session

from app.access import api_keys
from app.budgets import limits as budget_limits
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.errors import AppError, InvalidInput
from app.models import ApiKey


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = groups.add_parser("keys", help="API keys")
    group.set_defaults(handler=run)
    keys = group.add_subparsers(dest="command", required=True)

    create = keys.add_parser("create", help="issue a key and print it (shown this once)")
    create.add_argument("--user", required=True, help="the user the key acts for")
    create.add_argument("--admin", action="store_true", help="give the key the admin role")
    create.add_argument("--name", help="a label for people, e.g. where the key is used")
    create.add_argument("--json", action="store_true", help="print the key and its row as JSON")
    _limit_arguments(create)

    limit = keys.add_parser("limit", help="change a key's model allow-list or budget")
    limit.add_argument("key_id")
    _limit_arguments(limit)
    limit.add_argument("--any-model", action="store_true", help="remove the model allow-list")
    limit.add_argument("--no-budget", action="store_true", help="remove the key's own budget")

    listing = keys.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="print JSON")

    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-model",
        action="append",
        dest="allow_models",
        metavar="MODEL",
        help="a model the key may call through the gateway (repeat for several)",
    )
    parser.add_argument(
        "--budget-usd", type=_usd, help="the key's own budget in USD, over its whole life"
    )


def _usd(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("the budget must be a non-negative amount")
    return amount


def _row(row: ApiKey) -> dict[str, str | None]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": row.id,
        "user_id": row.user_id,
        "role": row.role,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
        "revoked_at": iso(row.revoked_at),
        "allowed_models": ",".join(row.allowed_models) if row.allowed_models else None,
    }


def _table(rows: list[ApiKey]) -> list[str]:
    columns = ("id", "user_id", "role", "prefix", "name", "created_at", "last_used_at", "status")
    table = [
        {
            **_row(r),
            "status": "revoked" if r.revoked_at is not None else "active",
            "created_at": f"{r.created_at:%Y-%m-%d %H:%M}",
            "last_used_at": f"{r.last_used_at:%Y-%m-%d %H:%M}" if r.last_used_at else "never",
        }
        for r in rows
    ]
    widths = {c: max([len(c), *(len(str(t[c] or "")) for t in table)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for t in table:
        lines.append("  ".join(str(t[c] or "").ljust(widths[c]) for c in columns).rstrip())
    return lines


def _limit(session: Session, settings: Settings, args: argparse.Namespace) -> str:
    """``asa keys limit``: what changed, said in one line."""
    if args.allow_models and args.any_model:
        raise InvalidInput("--allow-model and --any-model exclude each other.")
    if args.budget_usd is not None and args.no_budget:
        raise InvalidInput("--budget-usd and --no-budget exclude each other.")
    row = api_keys.get_key(session, args.key_id)
    said = []
    if args.allow_models or args.any_model:
        api_keys.set_allowed_models(session, row.id, None if args.any_model else args.allow_models)
        said.append("models: " + (", ".join(args.allow_models) if args.allow_models else "any"))
    if args.budget_usd is not None or args.no_budget:
        budget = None if args.no_budget else args.budget_usd
        budget_limits.set_key_budget(session, settings, row.id, budget, updated_by="cli")
        said.append(f"budget: ${budget}" if budget is not None else "budget: none")
    if not said:
        raise InvalidInput(
            "Say what to change: --allow-model, --any-model, --budget-usd, --no-budget."
        )
    return f"Key {row.id}: " + "; ".join(said) + "."


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``keys`` command; returns the exit status (output is printed after the commit)."""
    engine = create_db_engine(settings.database_url)
    out: list[str] = []
    note = ""
    try:
        with transaction(create_session_factory(engine)) as session:
            if args.command == "create":
                issued = api_keys.create_key(
                    session,
                    user_id=args.user,
                    role="admin" if args.admin else "user",
                    name=args.name,
                    allowed_models=args.allow_models,
                )
                row = issued.row
                if args.budget_usd is not None:
                    budget_limits.set_key_budget(
                        session, settings, row.id, args.budget_usd, updated_by="cli"
                    )
                out.append(
                    json.dumps({**_row(row), "key": issued.key}) if args.json else issued.key
                )
                note = (
                    f"Created key {row.id} for {row.user_id} ({row.role}). "
                    "Store it now: it cannot be shown again."
                )
            elif args.command == "limit":
                note = _limit(session, settings, args)
            elif args.command == "list":
                rows = api_keys.list_keys(session)
                out = [json.dumps([_row(r) for r in rows])] if args.json else _table(rows)
            else:
                row = api_keys.revoke_key(session, args.key_id)
                note = f"Revoked key {row.id} of {row.user_id}."
    except AppError as exc:
        print(f"asa: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    for line in out:
        print(line)
    if note:
        print(note, file=sys.stderr)
    return 0
