"""Persist usage rows exactly once: insert-if-new plus the daily rollups, in one transaction.

Two rollups are incremented with each new row: ``usage_rollup_daily`` (per day, user, task,
model and agent: the task and user reports) and ``usage_rollup_daily_overall`` (per day, model
and agent: everyone's spend, ~20 rows a day however many tasks ran).

When the database is unreachable the row goes to the local spool and a background thread
replays it when the database is back. Because ``request_id`` is unique and the rollup is only
incremented when the row itself was inserted, a replayed or repeated write never counts twice.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from app.core.prepared import Statement, Tx, dialect_insert, write_gate
from app.models import LATENCY_BUCKETS_MS, LLMUsage, UsageRollupDaily, UsageRollupDailyOverall
from app.observability import USAGE_SPOOL_PENDING, USAGE_SPOOLED
from app.tracking.record import UsageRecord
from app.tracking.spool import UsageSpool

logger = logging.getLogger(__name__)

_ROLLUP_KEY = ("day", "user_id", "task_id", "model", "agent")
_OVERALL_KEY = ("day", "model", "agent")
_ROLLUP_SUMS = (
    "requests", "successes", "errors", "blocked", "unpriced_calls", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_pico_usd",
    "latency_ms_sum", *(f"lat_b{i:02d}" for i in range(len(LATENCY_BUCKETS_MS) + 1)),
)  # fmt: skip


def latency_bucket(latency_ms: float) -> int:
    """Index of the rollup latency bucket holding ``latency_ms`` (upper bounds inclusive)."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def _add_row(dialect: str) -> Any:
    usage: Any = LLMUsage.__table__
    insert = dialect_insert(dialect)
    return insert(usage).on_conflict_do_nothing(index_elements=["request_id"]).returning(usage.c.id)


def _add_to(table: Any, key: tuple[str, ...]) -> Callable[[str], Any]:
    def build(dialect: str) -> Any:
        stmt = dialect_insert(dialect)(table)
        return stmt.on_conflict_do_update(
            index_elements=list(key),
            set_={name: table.c[name] + stmt.excluded[name] for name in _ROLLUP_SUMS},
        )

    return build


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
ADD_ROW = Statement(_add_row, column_keys=[*_ROW_FIELDS, "total_tokens"])
ADD_TO_ROLLUP = Statement(
    _add_to(UsageRollupDaily.__table__, _ROLLUP_KEY), column_keys=[*_ROLLUP_KEY, *_ROLLUP_SUMS]
)
ADD_TO_OVERALL = Statement(
    _add_to(UsageRollupDailyOverall.__table__, _OVERALL_KEY),
    column_keys=[*_OVERALL_KEY, *_ROLLUP_SUMS],
)


def row_values(record: UsageRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in _ROW_FIELDS}
    values["total_tokens"] = record.total_tokens
    return values


def rollup_values(record: UsageRecord) -> dict[str, Any]:
    values: dict[str, Any] = {
        "day": record.timestamp.date(),
        "user_id": record.user_id or "",
        "task_id": record.task_id or "",
        "model": record.model,
        "agent": record.agent or "",
        "requests": 1,
        "successes": int(record.status == "success"),
        "errors": int(record.status == "error"),
        "blocked": int(record.status == "blocked"),
        "unpriced_calls": int(record.cost_status == "unpriced" and record.status != "blocked"),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "total_tokens": record.total_tokens,
        "cost_pico_usd": record.cost_pico_usd,
        "latency_ms_sum": record.latency_ms,
    }
    bucket = latency_bucket(record.latency_ms)
    for i in range(len(LATENCY_BUCKETS_MS) + 1):
        values[f"lat_b{i:02d}"] = int(i == bucket)
    return values


def insert_usage(conn: Tx | Connection, record: UsageRecord) -> bool:
    """Insert the row and, only if it is new, add it to the rollups. True if inserted.

    Runs in the caller's transaction: a ``Tx`` of the write gate, or a SQLAlchemy connection.
    """
    tx = Tx.coerce(conn)
    # RETURNING tells whether the row was new; rowcount is not reliable here on every driver.
    if tx.execute(ADD_ROW, row_values(record)).fetchone() is None:
        return False
    values = rollup_values(record)
    tx.execute(ADD_TO_ROLLUP, values)
    # Last: every writer of this (day, model, agent) updates the same row; its lock is held
    # from here to the commit, so as briefly as possible.
    tx.execute(ADD_TO_OVERALL, values)
    return True


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    persisted: bool  # False: the row is in the spool
    also_committed: bool  # the joined work committed with the row

    def __bool__(self) -> bool:
        return self.persisted


class UsageWriter:
    """Writes usage records; never raises to the caller of an LLM call."""

    def __init__(self, engine: Engine, spool: UsageSpool) -> None:
        self.engine = engine
        self.gate = write_gate(engine)
        self.spool = spool
        self._replay_lock = threading.Lock()

    def write(self, record: UsageRecord, also: Callable[[Tx], None] | None = None) -> WriteOutcome:
        """Persist ``record``, or spool it when the database cannot take it.

        ``also`` joins the row's transaction (one commit for both: the budget settles there).
        If anything in it fails, the row is written again on its own: ``also`` never costs a row.
        """
        for extra in (also, None) if also is not None else (None,):
            try:
                with self.gate.transaction() as tx:
                    insert_usage(tx, record)
                    if extra is not None:
                        extra(tx)
                return WriteOutcome(persisted=True, also_committed=extra is not None)
            except (OperationalError, DBAPIError) as exc:
                logger.warning("Could not write usage row %s: %s", record.request_id, exc)
            except Exception:
                logger.exception("Work joined to usage row %s failed", record.request_id)
        self.spool.append(record)
        USAGE_SPOOLED.inc()
        USAGE_SPOOL_PENDING.inc()
        return WriteOutcome(persisted=False, also_committed=False)

    def insert_batch(self, records: Iterable[UsageRecord]) -> None:
        with self.gate.transaction() as tx:
            for record in records:
                insert_usage(tx, record)

    def replay_spool(self) -> int:
        """Move spooled rows into the database; safe to call from several threads/processes."""
        with self._replay_lock:
            try:
                replayed = self.spool.replay(self.insert_batch)
            except (OperationalError, DBAPIError):
                return 0  # still down; try again later
            finally:
                USAGE_SPOOL_PENDING.set(self.spool.pending())
            return replayed


class SpoolReplayer:
    """Background thread replaying the spool every ``interval`` seconds until stopped."""

    def __init__(self, writer: UsageWriter, interval: float) -> None:
        self._writer = writer
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-spool-replay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._writer.spool.files():
                try:
                    self._writer.replay_spool()
                except Exception:
                    logger.exception("Spool replay failed; will retry")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self._writer.replay_spool()
        except Exception:
            logger.exception("Final spool replay failed; rows stay spooled for the next start")
