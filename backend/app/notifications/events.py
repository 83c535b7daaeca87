"""The events that notifications tell of: kinds, deduplication ids, payloads and their text.

An event's id is its deduplication key, built from the fact it reports: a threshold's scope,
subject and window (so it fires once per window), a task's id (a task finishes once), a model and
month. The same fact recorded twice is one outbox row, and a receiver that sees an id again
(delivery is at least once) knows it is the same event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from app.core.money import pico_to_usd
from app.models.notifications import EVENT_ID_MAX_CHARS


class EventKind(StrEnum):
    BUDGET_SOFT_THRESHOLD = "budget.soft_threshold"
    BUDGET_EXHAUSTED = "budget.exhausted"
    TASK_SUCCEEDED = "task.succeeded"
    TASK_FAILED = "task.failed"
    MODEL_UNPRICED = "model.unpriced"
    SPEND_ANOMALY = "usage.anomaly"
    FORECAST_OVER_BUDGET = "budget.forecast_over"
    TEST = "test"


# What a subscription may name: one kind, or every kind.
ALL_KINDS = "*"
SUBSCRIBABLE_KINDS = tuple(k.value for k in EventKind if k is not EventKind.TEST)


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the outbox stores it; ``data`` must be JSON-serializable."""

    id: str
    kind: EventKind
    data: Mapping[str, Any]
    subject_user_id: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def body(self) -> dict[str, Any]:
        """The JSON document a webhook receives (and a Slack or e-mail message describes)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "created_at": self.created_at.isoformat(),
            "subject_user_id": self.subject_user_id,
            "data": dict(self.data),
        }


def event_id(*parts: str) -> str:
    """``part:part:...``; an id too long for the column keeps its start and a digest."""
    text = ":".join(parts)
    if len(text) <= EVENT_ID_MAX_CHARS:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{text[: EVENT_ID_MAX_CHARS - len(digest) - 1]}~{digest}"


def _usd(pico: int | None) -> str | None:
    return None if pico is None else format(pico_to_usd(pico), "f")


def budget_event(
    kind: EventKind,
    *,
    scope: str,
    subject_id: str,
    window_start: date | None,
    limit_pico: int | None,
    spent_pico: int | None,
    soft_threshold: Decimal | None = None,
    user_id: str | None = None,
) -> Event:
    """A budget's soft threshold crossed or its limit reached, once per scope, subject and
    window. ``user_id``: whose event it is (the user of a user scope, a task's user)."""
    window = window_start.isoformat() if window_start is not None else "lifetime"
    data: dict[str, Any] = {
        "scope": scope,
        "subject_id": subject_id or None,
        "window_start": window_start.isoformat() if window_start is not None else None,
        "limit_usd": _usd(limit_pico),
        "spent_usd": _usd(spent_pico),
    }
    if soft_threshold is not None:
        data["soft_threshold"] = format(soft_threshold.normalize(), "f")
    return Event(
        id=event_id(kind.value, scope, subject_id or "-", window),
        kind=kind,
        data=data,
        subject_user_id=user_id,
    )


def task_finished_event(
    *,
    task_id: str,
    user_id: str,
    status: str,
    reason: str | None,
    repo_url: str,
    attempts: int,
    cost_pico: int,
) -> Event | None:
    """A task's end: ``task.succeeded``, or ``task.failed`` for a failure, an error or a
    budget that stopped it; None for a cancelled task (its user asked for that)."""
    if status == "cancelled":
        return None
    kind = EventKind.TASK_SUCCEEDED if status == "succeeded" else EventKind.TASK_FAILED
    return Event(
        id=event_id("task.finished", task_id),
        kind=kind,
        data={
            "task_id": task_id,
            "status": status,
            "reason": (reason or "")[:1000] or None,
            "repo_url": repo_url,
            "attempts": attempts,
            "cost_usd": _usd(cost_pico),
        },
        subject_user_id=user_id,
    )


def model_unpriced_event(model: str, month: date, calls: int) -> Event:
    """Calls to a model with no known price (costed at 0), once per model and month."""
    return Event(
        id=event_id(EventKind.MODEL_UNPRICED.value, month.strftime("%Y-%m"), model),
        kind=EventKind.MODEL_UNPRICED,
        data={"model": model, "month": month.strftime("%Y-%m"), "unpriced_calls": calls},
    )


def anomaly_event(
    *,
    dimension: str,
    subject: str,
    hour_start: datetime,
    hour_in_progress: bool,
    spend_usd: Decimal,
    baseline_median_usd: Decimal,
    band_upper_usd: Decimal,
    score: float,
) -> Event:
    """An hour of a user's or a model's spend out of its band, once per subject and hour
    (``app.usage.anomalies``). A user's anomaly is that user's event; a model's is everyone's."""
    hour = hour_start.astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
    return Event(
        id=event_id(EventKind.SPEND_ANOMALY.value, dimension, subject, hour),
        kind=EventKind.SPEND_ANOMALY,
        data={
            "dimension": dimension,
            "subject": subject,
            "hour_start": hour,
            "spend_usd": format(spend_usd, "f"),
            "baseline_median_usd": format(baseline_median_usd, "f"),
            "band_upper_usd": format(band_upper_usd, "f"),
            "score": score,
            "hour_in_progress": hour_in_progress,
        },
        subject_user_id=subject if dimension == "user" else None,
    )


def forecast_over_budget_event(
    *,
    user_id: str,
    month_start: date,
    limit_usd: Decimal,
    projected_usd: Decimal,
    low_usd: Decimal,
    high_usd: Decimal,
    spent_usd: Decimal,
) -> Event:
    """A user's month-end forecast above their monthly budget, once per user and month."""
    month = month_start.strftime("%Y-%m")
    return Event(
        id=event_id(EventKind.FORECAST_OVER_BUDGET.value, "user_monthly", user_id, month),
        kind=EventKind.FORECAST_OVER_BUDGET,
        data={
            "scope": "user_monthly",
            "subject_id": user_id,
            "month": month,
            "limit_usd": format(limit_usd, "f"),
            "projected_usd": format(projected_usd, "f"),
            "low_usd": format(low_usd, "f"),
            "high_usd": format(high_usd, "f"),
            "spent_usd": format(spent_usd, "f"),
        },
        subject_user_id=user_id,
    )


def channel_test_event(channel_name: str, by: str) -> Event:
    now = datetime.now(UTC)
    return Event(
        id=event_id("test", channel_name, now.strftime("%Y%m%dT%H%M%S.%fZ")),
        kind=EventKind.TEST,
        data={"channel": channel_name, "requested_by": by},
        subject_user_id=by,
        created_at=now,
    )


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)


def render_text(event: Event) -> tuple[str, str]:
    """(subject, text) of an event for people: the Slack message and the e-mail."""
    d = event.data
    who = f" of {d['subject_id']}" if d.get("subject_id") else ""
    match event.kind:
        case EventKind.BUDGET_SOFT_THRESHOLD:
            share = Decimal(str(d.get("soft_threshold") or "0")) * 100
            subject = f"Budget {d['scope']}{who} passed {format(share.normalize(), 'f')}%"
            text = (
                f"Budget {d['scope']}{who} has spent ${d['spent_usd']} of its ${d['limit_usd']} "
                f"limit (window from {d['window_start'] or 'the start'})."
            )
        case EventKind.BUDGET_EXHAUSTED:
            subject = f"Budget {d['scope']}{who} exhausted: calls are blocked"
            text = (
                f"Budget {d['scope']}{who} refused an LLM call: ${d['spent_usd']} spent of its "
                f"${d['limit_usd']} limit (window from {d['window_start'] or 'the start'}). "
                "Calls in this scope are blocked until the window ends or the limit is raised."
            )
        case EventKind.TASK_SUCCEEDED | EventKind.TASK_FAILED:
            subject = f"Task {d['task_id']} {d['status']}"
            text = (
                f"Task {d['task_id']} ({d['repo_url']}) ended {d['status']} after "
                f"{d['attempts']} attempt(s), cost ${d['cost_usd']}."
            )
            if d.get("reason"):
                text += f" Reason: {d['reason']}"
        case EventKind.MODEL_UNPRICED:
            subject = f"Model {d['model']} has no price"
            text = (
                f"{d['unpriced_calls']} call(s) to {d['model']} in {d['month']} were recorded at "
                "cost 0: no price is known. Add it to PRICE_OVERRIDES to account for it."
            )
        case EventKind.SPEND_ANOMALY:
            when = " so far" if d.get("hour_in_progress") else ""
            subject = f"Spend anomaly: {d['dimension']} {d['subject']} at {d['hour_start']}"
            text = (
                f"The {d['dimension']} {d['subject']} spent ${d['spend_usd']} in the hour from "
                f"{d['hour_start']}{when}; its usual active hour costs ${d['baseline_median_usd']} "
                f"and the band ends at ${d['band_upper_usd']} (score {d['score']})."
            )
        case EventKind.FORECAST_OVER_BUDGET:
            subject = f"Forecast over budget: {d['subject_id']} in {d['month']}"
            text = (
                f"{d['subject_id']} is projected to spend ${d['projected_usd']} in {d['month']} "
                f"(range ${d['low_usd']} to ${d['high_usd']}), over the monthly budget of "
                f"${d['limit_usd']}; spent so far ${d['spent_usd']}."
            )
        case EventKind.TEST:
            subject = "ASA test notification"
            text = f"A test of channel {d['channel']}, sent by {d['requested_by']}."
    # One line: a model name or a reason may hold line breaks, which no e-mail header may.
    return "[ASA] " + " ".join(subject.split()), f"{text}\nEvent {event.id}"
