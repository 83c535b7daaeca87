"""``asa usage``: spend insights from the command line (the API's answers, as JSON or lines).

    asa usage forecast [--user U | --everyone] [--json]
    asa usage anomalies [--user U | --everyone] [--hours 24] [--json]
    asa usage recommendations [--user U | --everyone] [--days 30] [--json]

An administrator's view: any user's figures, or everyone's. Without ``--user`` or
``--everyone``, everyone's.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel

from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.usage import forecast as usage_forecast
from app.usage import insights

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return number

    return parse


def _user_id(value: str) -> str:
    if not _ID.match(value):
        raise argparse.ArgumentTypeError(f"not a user id: {value!r}")
    return value


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = groups.add_parser("usage", help="spend forecast, anomalies and recommendations")
    group.set_defaults(handler=run)
    commands = group.add_subparsers(dest="command", required=True)
    for name, what in (
        ("forecast", "the month's spend projected to its end, with a range"),
        ("anomalies", "hours of spend out of band (per user, and per model for everyone)"),
        ("recommendations", "waste, cost per fixed bug, cache use and cheaper models"),
    ):
        command = commands.add_parser(name, help=what)
        whose = command.add_mutually_exclusive_group()
        whose.add_argument("--user", type=_user_id, help="one user's figures")
        whose.add_argument("--everyone", action="store_true", help="everyone's (the default)")
        command.add_argument("--json", action="store_true", help="print the API's JSON answer")
        if name == "anomalies":
            command.add_argument("--hours", type=_bounded(1, 168), default=24)
        if name == "recommendations":
            command.add_argument("--days", type=_bounded(1, 366), default=30)


def _lines(args: argparse.Namespace, answer: BaseModel) -> list[str]:
    body = answer.model_dump(mode="json")
    if args.command == "forecast":
        return [
            f"{body['user_id'] or 'everyone'}: ${body['projected_usd']} by {body['month_end']} "
            f"(80% range ${body['low_usd']} - ${body['high_usd']}; "
            f"spent ${body['spent_to_date_usd']} so far)"
        ]
    if args.command == "anomalies":
        return [
            f"{a['hour_start']}  {a['dimension']} {a['subject']}: ${a['spend_usd']} "
            f"(usual ${a['baseline_median_usd']}, band to ${a['band_upper_usd']}, "
            f"score {a['score']})"
            for a in body["items"]
        ] or ["No anomaly."]
    return [f"[{r['kind']}] {r['message']}" for r in body["recommendations"]] or [
        "Nothing to recommend."
    ]


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``usage`` command; returns the exit status."""
    engine = create_db_engine(settings.database_url)
    now = datetime.now(UTC)
    user = args.user
    try:
        with transaction(create_session_factory(engine)) as session:
            answer: BaseModel
            if args.command == "forecast":
                result = usage_forecast.forecast_spend(session, user, now)
                answer = insights.forecast_answer(result)
            elif args.command == "anomalies":
                answer = insights.anomalies(session, settings, user, now, args.hours)
            else:
                answer = insights.recommendations(session, settings, user, now, args.days)
    finally:
        engine.dispose()
    if args.json:
        print(answer.model_dump_json(indent=2))
    else:
        for line in _lines(args, answer):
            print(line)
    sys.stdout.flush()
    return 0
