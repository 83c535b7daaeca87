"""Persist usage rows exactly once: insert-if-new plus the daily rollups, in one transaction.

The rollups are incremented with each new row, all through :func:`apply_to_rollups`:
``usage_rollup_daily`` (per day, user, task, model, agent, provider and operation: the task
report), ``usage_rollup_task_total`` (per task, its calls and cost over all time: the web
overview's top tasks; not for calls of no task), ``usage_rollup_user_daily`` (per user, day,
model, provider and operation: the user report and everyone's spend by user),
``usage_rollup_hourly`` (per user, UTC hour and model, calls and cost only: the anomaly scan)
and ``usage_rollup_daily_overall`` (per day, model, agent, provider and operation: everyone's
spend, a few dozen rows a day however many tasks ran). The daily ones also sum the waste the
recommendations name (failed, truncated and retried calls' spend).

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, Date, Engine, bindparam, exists, func, or_
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from app.core.prepared import Statement, Tx, dialect_insert, write_gate
from app.models import (
    LATENCY_BUCKETS_MS,
    LLMUsage,
    TaskOutcome,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupHourly,
    UsageRollupTaskTotal,
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
_HOURLY_KEY = ("user_id", "hour", "model")
_HOURLY_SUMS = ("requests", "cost_pico_usd")  # narrow: it is paid on every call
_WASTE_SUMS = (
    "error_cost_pico_usd", "truncated_calls", "truncated_cost_pico_usd", "retried_calls",
    "retry_attempts", "retried_cost_pico_usd",
)  # fmt: skip
_LATENCY_FIELDS = tuple(f"lat_b{i:02d}" for i in range(len(LATENCY_BUCKETS_MS) + 1))
_NO_LATENCY = dict.fromkeys(_LATENCY_FIELDS, 0)
_ROLLUP_SUMS = (
    "requests", "successes", "errors", "blocked", "unpriced_calls", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "cost_pico_usd",
    "latency_ms_sum", *_LATENCY_FIELDS, *_WASTE_SUMS,
)  # fmt: skip


def latency_bucket(latency_ms: float) -> int:
    """Index of the rollup latency bucket holding ``latency_ms`` (upper bounds inclusive)."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def _add_row(dialect: str) -> Any:
    usage: Any = LLMUsage.__table__
    insert = dialect_insert(dialect)
    return insert(usage).on_conflict_do_nothing(index_elements=["request_id"]).returning(usage.c.id)


def _add_rows(dialect: str) -> Any:
    insert = dialect_insert(dialect)
    return insert(LLMUsage.__table__).on_conflict_do_nothing(index_elements=["request_id"])


def _add_to(
    table: Any, key: tuple[str, ...], sums: tuple[str, ...] = _ROLLUP_SUMS
) -> Callable[[str], Any]:
    def build(dialect: str) -> Any:
        stmt = dialect_insert(dialect)(table)
        return stmt.on_conflict_do_update(
            index_elements=list(key),
            set_={name: table.c[name] + stmt.excluded[name] for name in sums},
        )

    return build


def _add_to_task_total(dialect: str) -> Any:
    """The per-task total: calls and cost added, the first and last day widened, the greatest
    user kept (the overview's owner of a task), and ``late`` set for good when the task's
    outcome was snapshot already (``app.usage.outcomes``): a call, or a recompute's delta, that
    reached a finished task, flagged in the same statement."""
    table: Any = UsageRollupTaskTotal.__table__
    outcome: Any = TaskOutcome.__table__
    day = bindparam("day", type_=Date)
    task_id: Any = bindparam("task_id")
    stmt = dialect_insert(dialect)(table).values(
        task_id=task_id,
        user_id=bindparam("user_id"),
        first_day=day,
        last_day=day,
        requests=bindparam("requests"),
        cost_pico_usd=bindparam("cost_pico_usd"),
        late=exists().where(outcome.c.task_id == task_id),
    )
    # Two-argument min/max are SQLite's scalar functions; PostgreSQL spells them least/greatest.
    pg = dialect == "postgresql"
    least, greatest = (func.least, func.greatest) if pg else (func.min, func.max)
    c, new = table.c, stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["task_id"],
        set_={
            "user_id": greatest(c.user_id, new.user_id),
            "first_day": least(c.first_day, new.first_day),
            "last_day": greatest(c.last_day, new.last_day),
            "requests": c.requests + new.requests,
            "cost_pico_usd": c.cost_pico_usd + new.cost_pico_usd,
            "late": or_(c.late, new.late),
        },
    )


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
ADD_ROW = Statement(_add_row, column_keys=[*_ROW_FIELDS, "total_tokens"])
ADD_ROWS = Statement(_add_rows, column_keys=[*_ROW_FIELDS, "total_tokens"])  # no RETURNING
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
ADD_TO_TASK_TOTAL = Statement(_add_to_task_total)  # not run for calls of no task
ADD_TO_HOURLY = Statement(
    _add_to(UsageRollupHourly.__table__, _HOURLY_KEY, _HOURLY_SUMS),
    column_keys=[*_HOURLY_KEY, *_HOURLY_SUMS],
)
# Every rollup, in the order a transaction locks their rows: the per-task ones (one writer at a
# time per task), the user's, then everyone's (shared by every writer of the day and model), so
# the most contended lock is taken last and held as briefly as possible.
# (The user's hourly spend, ADD_TO_HOURLY, is locked right after the user's daily row.)


@dataclass(frozen=True, slots=True)
class _Rollup:
    statement: Statement
    # The values the statement reads besides the sums: rows that agree on them can be added in
    # one execution (``insert_new_usage``).
    group_by: tuple[str, ...]
    tasks_only: bool = False  # calls of no task have no row here (nor one hot row for them all)


_ROLLUPS = (
    _Rollup(ADD_TO_ROLLUP, _ROLLUP_KEY),
    _Rollup(ADD_TO_TASK_TOTAL, ("task_id", "user_id", "day"), tasks_only=True),
    _Rollup(ADD_TO_USER, _USER_KEY),
    _Rollup(ADD_TO_HOURLY, _HOURLY_KEY),
    _Rollup(ADD_TO_OVERALL, _OVERALL_KEY),
)
ROLLUP_STATEMENTS = tuple(rollup.statement for rollup in _ROLLUPS)
ROLLUP_KEY_FIELDS: tuple[str, ...] = tuple(
    dict.fromkeys((*_ROLLUP_KEY, *_USER_KEY, *_HOURLY_KEY, *_OVERALL_KEY))
)
ROLLUP_SUM_FIELDS: tuple[str, ...] = _ROLLUP_SUMS


def row_values(record: UsageRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in _ROW_FIELDS}
    values["total_tokens"] = record.total_tokens
    return values


def utc_day(moment: datetime) -> date:
    """The UTC calendar day of ``moment`` (a naive one is taken as UTC, as the ledger stores)."""
    return moment.astimezone(UTC).date() if moment.tzinfo is not None else moment.date()


def utc_hour(moment: datetime) -> datetime:
    """The start of the UTC hour of ``moment`` (a naive one is taken as UTC), timezone-aware."""
    moment = moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return moment.replace(minute=0, second=0, microsecond=0)


def rollup_values(record: UsageRecord) -> dict[str, Any]:
    """What ``record`` adds to the rollups: its key (``ROLLUP_KEY_FIELDS``, '' for a missing
    user, task or agent) and its sums (``ROLLUP_SUM_FIELDS``)."""
    cost = record.cost_pico_usd
    error = record.status == "error"
    truncated = record.finish_reason == "length"
    retried = record.attempts > 1
    values: dict[str, Any] = {
        "day": utc_day(record.timestamp),
        "hour": utc_hour(record.timestamp),
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
        "error_cost_pico_usd": cost if error else 0,
        "truncated_calls": int(truncated),
        "truncated_cost_pico_usd": cost if truncated else 0,
        "retried_calls": int(retried),
        "retry_attempts": record.attempts - 1 if retried else 0,
        "retried_cost_pico_usd": cost if retried else 0,
    }
    values.update(_NO_LATENCY)
    values[_LATENCY_FIELDS[latency_bucket(record.latency_ms)]] = 1
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
    for rollup in _ROLLUPS:
        if signed["task_id"] or not rollup.tasks_only:
            tx.execute(rollup.statement, signed)


class RowsNotNew(Exception):
    """A row of a batch given to ``insert_new_usage`` was in the ledger already."""


def insert_new_usage(tx: Tx, records: Sequence[UsageRecord]) -> None:
    """Insert ``records``, rows of calls just made, and add them to every rollup: the rows in
    one ``executemany``, each rollup's increments summed per key first, so a batch of calls of
    the same task costs one statement per rollup, not one per row and rollup.

    Raises ``RowsNotNew`` when any of them was written before (a replay): the caller rolls the
    transaction back and writes them one by one with ``insert_usage``, which skips that row.
    """
    if tx.execute_many(ADD_ROWS, [row_values(r) for r in records]).rowcount != len(records):
        raise RowsNotNew
    values = [rollup_values(record) for record in records]
    for rollup in _ROLLUPS:
        sums: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in values:
            if rollup.tasks_only and not row["task_id"]:
                continue
            key = tuple(row[name] for name in rollup.group_by)
            total = sums.get(key)
            if total is None:
                sums[key] = dict(row)
            else:
                for name in ROLLUP_SUM_FIELDS:
                    total[name] += row[name]
        if len(sums) == 1:
            tx.execute(rollup.statement, next(iter(sums.values())))
        elif sums:  # in key order: every writer locks the rows of a rollup in the same order
            tx.execute_many(rollup.statement, [sums[key] for key in sorted(sums)])


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
        *,
        also_if_new: bool = False,
    ) -> WriteOutcome:
        """Persist ``record``, or spool it when the database cannot take it.

        ``also`` joins the row's transaction (one commit for both: the budget settles there).
        If anything in it fails, the row is written again on its own: ``also`` never costs a row.
        On an outage (or while the breaker is open) the row is spooled at once, with
        ``settlement`` (the reservation ``also`` would have settled) to be settled on replay.
        ``also_if_new``: run ``also`` only if the row is new (a row already in the ledger was
        committed with it: a write repeated after the writer process died unacknowledged).
        """
        for extra in (also, None) if also is not None else (None,):
            try:
                with self.breaker.transaction(self.gate) as tx:
                    inserted = insert_usage(tx, record)
                    if extra is not None and (inserted or not also_if_new):
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
        self,
        record: UsageRecord,
        settlement: Mapping[str, Any] | None = None,
        *,
        row_written: bool = False,
    ) -> WriteOutcome:
        """Put the row (and its settlement) in the spool. The replay inserts the row once and
        settles with it; ``row_written``: the row committed without its settlement, which the
        replay then does although the row is not new."""
        self.spool.append(record, settlement, row_written=row_written)
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
                    inserted = insert_usage(tx, entry.record)
                    if (
                        entry.settlement is not None
                        and replay_settlement is not None
                        and (inserted or entry.row_written)
                    ):
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
