"""Export usage rows as CSV or JSON, streamed: one database batch in memory at a time.

The rows are ``llm_usage`` columns in time order, plus ``cost_usd`` (the exact decimal of
``cost_pico_usd``). Timestamps are ISO 8601 in UTC. In CSV, text cells that a spreadsheet would
run as a formula (starting with ``= + - @``, tab or carriage return) are prefixed with ``'``,
as OWASP recommends; JSON values are exact.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.core.errors import Forbidden, InvalidInput
from app.core.money import pico_to_usd
from app.usage import queries as usage_queries
from app.usage.report import authorize_task

ExportFormat = Literal["csv", "json"]
COLUMNS: tuple[str, ...] = (*usage_queries.EXPORT_COLUMNS, "cost_usd")
MEDIA_TYPES: dict[str, str] = {"csv": "text/csv; charset=utf-8", "json": "application/json"}
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class ExportFilter:
    task_id: str | None = None
    user_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def filename(self, fmt: ExportFormat) -> str:
        scope = (
            f"task-{self.task_id}"
            if self.task_id
            else f"user-{self.user_id}"
            if self.user_id
            else "all"
        )
        return f"usage-{scope}.{fmt}"


def authorize_export(session: Session, principal: Principal, flt: ExportFilter) -> None:
    """The rules of the usage views: a task's rows for an admin or the task's user; a user's
    rows for that user or an admin; anything wider for an admin only."""
    if flt.since is not None and flt.until is not None and flt.since >= flt.until:
        raise InvalidInput("since must be earlier than until.")
    if flt.task_id is not None:
        authorize_task(session, principal, flt.task_id)
    if flt.user_id is not None:
        principal.ensure_can_read_user(flt.user_id)
    if flt.task_id is None and flt.user_id is None and not principal.is_admin:
        raise Forbidden("Exporting everyone's usage is for administrators; pass your user_id.")


def _export_value(name: str, value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite returns naive UTC
        return aware.astimezone(UTC).isoformat()
    return value


def _rows(engine: Engine, flt: ExportFilter, batch_size: int) -> Iterator[dict[str, Any]]:
    with engine.connect() as conn:
        for row in usage_queries.iter_usage_rows(
            conn,
            task_id=flt.task_id,
            user_id=flt.user_id,
            since=flt.since,
            until=flt.until,
            batch_size=batch_size,
        ):
            out = {name: _export_value(name, value) for name, value in row.items()}
            out["cost_usd"] = format(pico_to_usd(row["cost_pico_usd"]), "f")
            yield out


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_chunks(rows: Iterator[dict[str, Any]], rows_per_chunk: int) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    pending = 0
    for row in rows:
        writer.writerow([_csv_cell(row[name]) for name in COLUMNS])
        pending += 1
        if pending >= rows_per_chunk:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue()


def _json_chunks(rows: Iterator[dict[str, Any]], rows_per_chunk: int) -> Iterator[str]:
    parts = ["["]
    first = True
    for row in rows:
        parts.append(("" if first else ",") + json.dumps(row, separators=(",", ":")))
        first = False
        if len(parts) >= rows_per_chunk:
            yield "".join(parts)
            parts = []
    parts.append("]")
    yield "".join(parts)


def export_usage(
    engine: Engine,
    flt: ExportFilter,
    fmt: ExportFormat,
    *,
    batch_size: int = 1000,
) -> Iterator[str]:
    """The export as text chunks; the query runs lazily, when the first chunk is asked for.

    It uses its own connection, held for as long as the stream is read, so call
    :func:`authorize_export` first (in the request's session).
    """
    rows = _rows(engine, flt, batch_size)
    if fmt == "csv":
        return _csv_chunks(rows, batch_size)
    return _json_chunks(rows, batch_size)
