"""Persist usage rows exactly once: insert-if-new plus the daily rollups, in one transaction.

Three rollups are incremented with each new row, all through :func:`apply_to_rollups`:
``usage_rollup_daily`` (per day, user, task, model, agent, provider and operation: the task
report), ``usage_rollup_user_daily`` (per user, day, model, provider and operation: the user
report and everyone's spend by user) and ``usage_rollup_daily_overall`` (per day, model, agent,
provider and operation: everyone's spend, a few dozen rows a day however many tasks ran).

When the database is unreachable the row goes to the local spool, with the budget settlement
of its call, and a background thread replays both in one transaction when the database is back
(at once when the circuit breaker, ``app.tracking.breaker``, sees it recover). While the breaker
is open a write does not touch the database at all. Because ``request_id`` is unique and the
rollup is only incremented when the row itself was inserted, a replayed or repeated write never
counts twice.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from app.core.prepared import Statement, Tx, dialect_insert, write_gate
from app.models import (
    LATENCY_BUCKETS_MS,
    LLMUsage,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupUserDaily,
)
from app.observability import USAGE_SPOOL_PENDING, USAGE_SPOOLED
from app.tracking.breaker import DatabaseUnavailable, database_breaker
from app.tracking.record import UsageRecord
from app.tracking.spool import Spooled, UsageSpool

logger = logging.getLogger(__name__)

_ROLLUP_KEY = ("day", "user_id", "task_id", "model", "agent", "provider", "operation")
_USER_KEY = ("user_id", "day", "model", "provider", "operation")
_OVERALL_KEY = ("day", "model", "agent", "provider", "operation")
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
ADD_TO_USER = Statement(
    _add_to(UsageRollupUserDaily.__table__, _USER_KEY), column_keys=[*_USER_KEY, *_ROLLUP_SUMS]
)
ADD_TO_OVERALL = Statement(
    _add_to(UsageRollupDailyOverall.__table__, _OVERALL_KEY),
    column_keys=[*_OVERALL_KEY, *_ROLLUP_SUMS],
)
# Every rollup, in the order a transaction locks their rows: the per-task row (one writer at a
# time per task), the user's, then everyone's (shared by every writer of the day and model), so
# the most contended lock is taken last and held as briefly as possible.
ROLLUP_STATEMENTS = (ADD_TO_ROLLUP, ADD_TO_USER, ADD_TO_OVERALL)
ROLLUP_KEY_FIELDS: tuple[str, ...] = tuple(dict.fromkeys((*_ROLLUP_KEY, *_USER_KEY, *_OVERALL_KEY)))
ROLLUP_SUM_FIELDS: tuple[str, ...] = _ROLLUP_SUMS


def row_values(record: UsageRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in _ROW_FIELDS}
    values["total_tokens"] = record.total_tokens
    return values


def utc_day(moment: datetime) -> date:
    """The UTC calendar day of ``moment`` (a naive one is taken as UTC, as the ledger stores)."""
    return moment.astimezone(UTC).date() if moment.tzinfo is not None else moment.date()


def rollup_values(record: UsageRecord) -> dict[str, Any]:
    """What ``record`` adds to the rollups: its key (``ROLLUP_KEY_FIELDS``, '' for a missing
    user, task or agent) and its sums (``ROLLUP_SUM_FIELDS``)."""
    values: dict[str, Any] = {
        "day": utc_day(record.timestamp),
        "user_id": record.user_id or "",
        "task_id": record.task_id or "",
        "model": record.model,
        "agent": record.agent or "",
        "provider": record.provider,
        "operation": record.operation,
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


def apply_to_rollups(conn: Tx | Connection, values: Mapping[str, Any], sign: int = 1) -> None:
    """Add ``values`` times ``sign`` to every usage rollup table, in the caller's transaction.

    The one door to the rollups: the usage writer adds each new row's ``rollup_values`` with
    ``sign=+1``; a price recompute that changes rows' cost passes, per rollup key, a delta
    (e.g. only ``cost_pico_usd`` and ``unpriced_calls``) or a row's old values with ``sign=-1``
    and its new ones with ``+1``, so every rollup moves together and exactly. ``values`` must
    hold every field of ``ROLLUP_KEY_FIELDS``; a sum it leaves out counts as 0. A key not yet
    in a table gets a row (with the signed values).
    """
    signed = values
    if sign != 1 or len(values) != len(ROLLUP_KEY_FIELDS) + len(ROLLUP_SUM_FIELDS):
        signed = {
            **{name: values[name] for name in ROLLUP_KEY_FIELDS},
            **{name: sign * values.get(name, 0) for name in ROLLUP_SUM_FIELDS},
        }
    tx = Tx.coerce(conn)
    for statement in ROLLUP_STATEMENTS:
        tx.execute(statement, signed)


def insert_usage(conn: Tx | Connection, record: UsageRecord) -> bool:
    """Insert the row and, only if it is new, add it to the rollups. True if inserted.

    Runs in the caller's transaction: a ``Tx`` of the write gate, or a SQLAlchemy connection.
    """
    tx = Tx.coerce(conn)
    # RETURNING tells whether the row was new; rowcount is not reliable here on every driver.
    if tx.execute(ADD_ROW, row_values(record)).fetchone() is None:
        return False
    apply_to_rollups(tx, rollup_values(record))
    return True


# Settles a spooled row's budget reservation inside the replay's transaction; the runtime
# installs the budget guard's (``app.budgets.guard.replay_settlement``).
SettlementReplayer = Callable[[Tx, UsageRecord, Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    persisted: bool  # False: the row is in the spool
    also_committed: bool  # the joined work committed with the row
    settlement_spooled: bool = False  # the row is in the spool with its settlement

    def __bool__(self) -> bool:
        return self.persisted


class UsageWriter:
    """Writes usage records; never raises to the caller of an LLM call."""

    def __init__(self, engine: Engine, spool: UsageSpool) -> None:
        self.engine = engine
        self.gate = write_gate(engine)
        self.breaker = database_breaker(engine)
        self.spool = spool
        self.settlement_replayer: SettlementReplayer | None = None
        self._replay_lock = threading.Lock()

    def write(
        self,
        record: UsageRecord,
        also: Callable[[Tx], None] | None = None,
        settlement: Mapping[str, Any] | None = None,
    ) -> WriteOutcome:
        """Persist ``record``, or spool it when the database cannot take it.

        ``also`` joins the row's transaction (one commit for both: the budget settles there).
        If anything in it fails, the row is written again on its own: ``also`` never costs a row.
        On an outage (or while the breaker is open) the row is spooled at once, with
        ``settlement`` (the reservation ``also`` would have settled) to be settled on replay.
        """
        for extra in (also, None) if also is not None else (None,):
            try:
                with self.breaker.transaction(self.gate) as tx:
                    insert_usage(tx, record)
                    if extra is not None:
                        extra(tx)
                return WriteOutcome(persisted=True, also_committed=extra is not None)
            except DatabaseUnavailable:
                break  # the breaker is open: no database wait, straight to the spool
            except (OperationalError, DBAPIError) as exc:
                logger.warning("Could not write usage row %s: %s", record.request_id, exc)
                if self.breaker.is_open:
                    break  # an outage: a second attempt would only wait again
            except Exception:
                logger.exception("Work joined to usage row %s failed", record.request_id)
        return self.spool_row(record, settlement if also is not None else None)

    def spool_row(
        self, record: UsageRecord, settlement: Mapping[str, Any] | None = None
    ) -> WriteOutcome:
        """Put the row (and its settlement) in the spool; replaying a row already written
        only settles (the row itself is inserted once)."""
        self.spool.append(record, settlement)
        USAGE_SPOOLED.inc()
        USAGE_SPOOL_PENDING.inc()
        return WriteOutcome(False, False, settlement_spooled=settlement is not None)

    def insert_batch(self, records: Iterable[UsageRecord]) -> None:
        self.insert_spooled([Spooled(record) for record in records])

    def insert_spooled(self, entries: list[Spooled]) -> None:
        """Insert spooled rows and settle their reservations, all in one transaction.

        A settlement that fails for any reason but the database (a bug) must not hold its rows
        back for ever: the rows are then inserted without the settlements (logged), and those
        reservations expire as before.
        """
        replay_settlement = self.settlement_replayer
        try:
            with self.breaker.transaction(self.gate) as tx:
                for entry in entries:
                    insert_usage(tx, entry.record)
                    if entry.settlement is not None and replay_settlement is not None:
                        replay_settlement(tx, entry.record, entry.settlement)
        except SQLAlchemyError:
            raise
        except Exception:
            if not any(entry.settlement is not None for entry in entries):
                raise
            logger.exception("Replaying spooled settlements failed; replaying the rows alone")
            self.insert_spooled([Spooled(entry.record) for entry in entries])

    def replay_spool(self) -> int:
        """Move spooled rows into the database; safe to call from several threads/processes."""
        with self._replay_lock:
            try:
                replayed = self.spool.replay(self.insert_spooled)
            except SQLAlchemyError as exc:
                logger.warning("Spool replay failed; will retry: %s", exc)
                return 0  # still down; try again later
            finally:
                USAGE_SPOOL_PENDING.set(self.spool.pending())
            return replayed


RECOVERY_HURRY_SECONDS = 5.0  # after the database is back, replay every ...
RECOVERY_RETRY_SECONDS = 0.25  # ... this often, whatever the interval


class SpoolReplayer:
    """Background thread replaying the spool every ``interval`` seconds until stopped, and
    at once (then often, for a few seconds) when the database breaker sees it recover."""

    def __init__(self, writer: UsageWriter, interval: float) -> None:
        self._writer = writer
        self._interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()  # the database came back: replay now, not next round
        writer.breaker.on_recovery(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="usage-spool-replay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        hurry_until = 0.0
        while True:
            woken = self._wake.wait(
                RECOVERY_RETRY_SECONDS if time.monotonic() < hurry_until else self._interval
            )
            self._wake.clear()
            if self._stop.is_set():
                return
            if woken:
                # Rows of calls that met the outage keep arriving for a moment after the
                # database is back, and a file being appended to is skipped: retry soon.
                hurry_until = time.monotonic() + RECOVERY_HURRY_SECONDS
            if self._writer.spool.files() and not self._writer.breaker.is_open:
                try:
                    self._writer.replay_spool()
                except Exception:
                    logger.exception("Spool replay failed; will retry")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self._writer.breaker.probe_now()  # back since the last probe? then replay now
            self._writer.replay_spool()
        except Exception:
            logger.exception("Final spool replay failed; rows stay spooled for the next start")
