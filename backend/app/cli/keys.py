"""``asa keys``: issue, list and revoke API keys.

    asa keys create --user alice [--admin] [--name "alice's laptop"]   # prints the key once
    asa keys list [--json]
    asa keys revoke KEY_ID

A running service notices a new key, or a revocation, within a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from app.access import api_keys
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.errors import AppError
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

    listing = keys.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="print JSON")

    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")


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
                )
                row = issued.row
                out.append(
                    json.dumps({**_row(row), "key": issued.key}) if args.json else issued.key
                )
                note = (
                    f"Created key {row.id} for {row.user_id} ({row.role}). "
                    "Store it now: it cannot be shown again."
                )
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
