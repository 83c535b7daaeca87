"""``asa usage ...`` and ``asa notifications ...`` as real subprocesses on the test database."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from app import cli
from app.core.config import Settings
from tests.notifications.conftest import SECRET, WebhookReceiver
from tests.test_cli import asa_command
from tests.usage.test_anomalies import seed_ledger

Asa = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def asa(database_url: str, tmp_path: Path) -> Asa:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "AUTO_MIGRATE"}}
    env["DATABASE_URL"] = database_url

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*asa_command(), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


def test_usage_insights_from_the_command_line(asa: Asa, engine: Engine) -> None:
    seed_ledger(engine, datetime.now(UTC))
    found = asa("usage", "anomalies", "--everyone", "--json")
    assert found.returncode == 0, found.stderr
    subjects = {(a["dimension"], a["subject"]) for a in json.loads(found.stdout)["items"]}
    assert subjects == {("user", "alice"), ("model", "m-a")}
    lines = asa("usage", "anomalies", "--user", "bob")
    assert (lines.returncode, lines.stdout) == (0, "No anomaly.\n")
    forecast = asa("usage", "forecast", "--user", "alice")
    assert forecast.returncode == 0 and forecast.stdout.startswith("alice: $")
    advice = asa("usage", "recommendations", "--days", "366", "--json")
    assert advice.returncode == 0 and json.loads(advice.stdout)["scope"] == "everyone"


@pytest.mark.parametrize(
    "args",
    [
        ("usage", "anomalies", "--hours", "0"),
        ("usage", "anomalies", "--hours", "abc"),
        ("usage", "recommendations", "--days", "100000"),
        ("usage", "forecast", "--user", "../etc/passwd"),
        ("usage", "forecast", "--user", "alice", "--everyone"),
        ("notifications", "subscriptions", "add", "abc", "--kind", "nope", "--all-users"),
        ("notifications", "subscriptions", "add", "abc", "--kind", "*"),  # whose events?
        ("notifications", "dead-letters", "list", "--limit", "0"),
    ],
)
def test_odd_arguments_are_refused_with_status_2(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # The real parser, in this process (a subprocess per case would only add start-up time).
    with pytest.raises(SystemExit) as exited:
        cli.run(list(args), Settings(database_url="sqlite:///unused.db"))
    assert exited.value.code == 2 and "error:" in capsys.readouterr().err


def test_channels_and_subscriptions_from_the_command_line(
    asa: Asa, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver = WebhookReceiver().up()
    try:
        added = asa("notifications", "channels", "add", "ops", "--webhook", receiver.url,
                    "--secret", SECRET)  # fmt: skip
        assert added.returncode == 0, added.stderr
        channel = json.loads(added.stdout)
        assert (channel["kind"], channel["signing_secret"]) == ("webhook", SECRET)
        sub = asa("notifications", "subscriptions", "add", channel["id"], "--kind",
                  "usage.anomaly", "--all-users")  # fmt: skip
        assert sub.returncode == 0, sub.stderr
        assert json.loads(sub.stdout)["event_kind"] == "usage.anomaly"
        tested = asa("notifications", "channels", "test", channel["id"])
        assert json.loads(tested.stdout)["delivered"] is True
        assert len(receiver.ids()) == 1  # signed with the secret, verified by the receiver
        listed = json.loads(asa("notifications", "subscriptions", "list").stdout)
        assert [s["channel_name"] for s in listed["items"]] == ["ops"]

        settings = Settings(database_url=database_url)
        bad_url = ["notifications", "channels", "add", "x", "--webhook", "ftp://example.com"]
        assert cli.run(bad_url, settings) == 2 and "url" in capsys.readouterr().err
        unknown = ["notifications", "channels", "delete", "0" * 32]
        assert cli.run(unknown, settings) == 1 and "not found" in capsys.readouterr().err
        gone = asa("notifications", "channels", "delete", channel["id"])
        assert gone.returncode == 0
        assert json.loads(asa("notifications", "channels", "list").stdout)["items"] == []
    finally:
        receiver.down()
