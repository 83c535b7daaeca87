"""``asa notifications``: channels, subscriptions and dead letters, as an administrator.

    asa notifications channels list
    asa notifications channels add NAME (--webhook URL [--secret S] | --slack URL |
                                         --target JSON) [--user-selectable] [--disabled]
    asa notifications channels test CHANNEL_ID
    asa notifications channels delete CHANNEL_ID
    asa notifications subscriptions list [--user U]
    asa notifications subscriptions add CHANNEL_ID --kind KIND (--user U | --all-users)
                                        [--recipient ADDRESS]
    asa notifications subscriptions delete SUBSCRIPTION_ID
    asa notifications dead-letters list [--limit 50]
    asa notifications dead-letters retry DELIVERY_ID

The same rules and checks as ``/api/v1/notifications`` (``app.notifications.service``), and the
API's answers printed as JSON; a bad URL, kind or address is refused with the API's message and
exit status 2. A webhook's signing secret is printed once, when its channel is added.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.errors import AppError
from app.notifications import service
from app.notifications.events import ALL_KINDS, SUBSCRIBABLE_KINDS
from app.schemas.notifications import ChannelCreate, SubscriptionCreate

CLI_ADMIN = Principal("cli", "admin")


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = groups.add_parser("notifications", help="notification channels and subscriptions")
    group.set_defaults(handler=run)
    areas = group.add_subparsers(dest="area", required=True)

    channels = areas.add_parser("channels", help="webhook, Slack and e-mail channels")
    ch = channels.add_subparsers(dest="command", required=True)
    ch.add_parser("list", help="every channel")
    add = ch.add_parser("add", help="add a channel (a webhook's secret is printed once)")
    add.add_argument("name")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--webhook", metavar="URL", help="a signed JSON webhook")
    target.add_argument("--slack", metavar="URL", help="a Slack incoming webhook")
    target.add_argument("--target", metavar="JSON", help="any target as the API takes it")
    add.add_argument("--secret", help="the webhook's signing secret (default: generated)")
    add.add_argument("--user-selectable", action="store_true", help="users may subscribe")
    add.add_argument("--disabled", action="store_true", help="add it switched off")
    for name, what in (("test", "send a test event now"), ("delete", "delete a channel")):
        ch.add_parser(name, help=what).add_argument("channel_id")

    subscriptions = areas.add_parser("subscriptions", help="who is told of which events")
    sub = subscriptions.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="subscriptions (everyone's, or one user's)")
    listing.add_argument("--user")
    create = sub.add_parser("add", help="subscribe a channel to a kind of event")
    create.add_argument("channel_id")
    create.add_argument("--kind", required=True, choices=(ALL_KINDS, *SUBSCRIBABLE_KINDS))
    whose = create.add_mutually_exclusive_group(required=True)
    whose.add_argument("--user", help="one user's events")
    whose.add_argument("--all-users", action="store_true", help="everyone's events")
    create.add_argument("--recipient", help="an e-mail channel's address for this subscription")
    sub.add_parser("delete", help="delete a subscription").add_argument("subscription_id")

    dead = areas.add_parser("dead-letters", help="deliveries that failed every try")
    dl = dead.add_subparsers(dest="command", required=True)
    dead_list = dl.add_parser("list", help="dead letters, newest first")
    dead_list.add_argument("--limit", type=int, default=50, choices=range(1, 1001), metavar="N")
    dl.add_parser("retry", help="deliver a dead letter again").add_argument("delivery_id")


def _channel_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.target is not None:
        target = json.loads(args.target)
    elif args.webhook is not None:
        target = {"kind": "webhook", "url": args.webhook}
        if args.secret is not None:
            target["signing_secret"] = args.secret
    else:
        target = {"kind": "slack", "webhook_url": args.slack}
    return {
        "name": args.name,
        "target": target,
        "enabled": not args.disabled,
        "user_selectable": args.user_selectable,
    }


def _act(session: Session, settings: Settings, args: argparse.Namespace) -> BaseModel | str:
    area, command = args.area, args.command
    if area == "channels":
        if command == "list":
            return service.list_channels(session, CLI_ADMIN)
        if command == "add":
            body = ChannelCreate.model_validate(_channel_body(args))
            return service.create_channel(session, CLI_ADMIN, body)
        if command == "test":
            return service.send_test(session, settings, CLI_ADMIN, args.channel_id)
        service.delete_channel(session, CLI_ADMIN, args.channel_id)
        return f"Deleted channel {args.channel_id}."
    if area == "subscriptions":
        if command == "list":
            return service.list_subscriptions(session, CLI_ADMIN, args.user)
        if command == "add":
            request = SubscriptionCreate.model_validate(
                {
                    "channel_id": args.channel_id,
                    "event_kind": args.kind,
                    "user_id": args.user,
                    "all_users": args.all_users,
                    "recipient": args.recipient,
                }
            )
            return service.create_subscription(session, CLI_ADMIN, request)
        service.delete_subscription(session, CLI_ADMIN, args.subscription_id)
        return f"Deleted subscription {args.subscription_id}."
    if command == "list":
        return service.list_dead_letters(session, args.limit, 0)
    return service.retry_dead_letter(session, args.delivery_id)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``notifications`` command; returns the exit status."""
    engine = create_db_engine(settings.database_url)
    try:
        with transaction(create_session_factory(engine)) as session:
            answer = _act(session, settings, args)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            print(f"asa: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"asa: --target is not JSON: {exc}", file=sys.stderr)
        return 2
    except AppError as exc:
        print(f"asa: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if isinstance(answer, str):
        print(answer, file=sys.stderr)
    else:
        print(answer.model_dump_json(indent=2))
    return 0
