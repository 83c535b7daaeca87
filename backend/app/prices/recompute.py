"""Reprice past ``llm_usage`` rows with the current prices, and everything summed from them.

A run walks the rows of its scope (a time range, a model, a provider) in (timestamp, id) order,
one batch per transaction. For each row the price book quotes the stored token counts again,
at the row's own time, for its provider and service tier, exactly as the call was quoted when it
was recorded (``usage_missing`` rows stay estimated, ``absurd_tokens`` rows stay unpriced;
blocked calls and errors without usage cost nothing and are left alone). In the same
transaction as the rows it changes, the batch applies the signed difference to

- every usage rollup, through the writer's one door (``app.tracking.writer.apply_to_rollups``),
- the budget counters that exist for the rows' task, user day, user month and global day
  (``app.budgets.store.apply_counter_deltas``; the spend trigger of revision 0005 fires on
  INSERT only, so an UPDATE here is booked once, by this code),
- the ``cost_usd`` metric of each finished task and its day's ``task_metrics_daily`` row.

Concurrent writes. Each batch's transaction first shuts out every other writer of the ledger:
on PostgreSQL ``LOCK TABLE llm_usage IN SHARE ROW EXCLUSIVE MODE`` (it waits for the usage
transactions in flight, which hold their rollup rows, and holds new ones back until the batch
commits: so no lock cycle with them is possible, and two recomputes take turns); on SQLite the
batch's first statement is a write, which takes the database's one write lock before the rows
are read. Every row the batch reads therefore has its rollups and counters committed, and the
difference it applies is from the row's committed cost: a call recorded during a run is priced
once, by its writer, and repriced (from that price) only if the run reaches it later.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, defaultdict, namedtuple
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import SQLAlchemyError

from app.budgets.store import CounterKey, apply_counter_deltas
from app.core.money import pico_to_usd
from app.core.prepared import Statement, Tx, dialect_insert
from app.models import (
    BudgetCounter,
    BudgetScope,
    LLMUsage,
    PriceRecompute,
    PriceSourceRow,
    TaskMetrics,
    TaskMetricsDaily,
    new_id,
)
from app.tasks.metrics_writer import COST_USD
from app.tracking.price_table import PriceSource
from app.tracking.pricing import PriceBook, QuoteTerms, TokenUsage
from app.tracking.writer import apply_to_rollups, utc_day, utc_hour

logger = logging.getLogger(__name__)

BATCH_ROWS = 5_000  # also how long live writers wait: one batch
INTERRUPTED = "interrupted: the service stopped before the run ended; run it again to finish"
_TASK_WINDOW = date(1970, 1, 1)
_usage = cast(Table, LLMUsage.__table__)
_audit = cast(Table, PriceRecompute.__table__)
_counter = cast(Table, BudgetCounter.__table__)
_u = _usage.c
_READ = (
    _u.id, _u.timestamp, _u.model, _u.provider, _u.operation, _u.user_id, _u.task_id, _u.agent,
    _u.prompt_tokens, _u.completion_tokens, _u.cached_tokens, _u.reasoning_tokens,
    _u.cost_pico_usd, _u.cost_status, _u.flags, _u.price_source, _u.price_entry, _u.price_tier,
    _u.service_tier, _u.status, _u.finish_reason, _u.attempts,  # the last three: waste sums
)  # fmt: skip
_PRICE_COLUMNS = ("cost_pico_usd", "cost_status", "price_source", "price_entry", "price_tier")


@dataclass(frozen=True, slots=True)
class RecomputeScope:
    """The rows to reprice: ``[since, until)`` (timezone-aware), and a model and provider."""

    until: datetime
    since: datetime | None = None
    model: str | None = None
    provider: str | None = None


@dataclass(slots=True)
class Totals:
    """What a run found, over the rows it examined."""

    rows_examined: int = 0
    rows_changed: int = 0
    cost_before_pico: int = 0
    cost_after_pico: int = 0
    unpriced_before: int = 0
    unpriced_after: int = 0
    sources_before: Counter[str] = field(default_factory=Counter)
    sources_after: Counter[str] = field(default_factory=Counter)

    def audit_values(self) -> dict[str, Any]:
        return {
            "rows_examined": self.rows_examined,
            "rows_changed": self.rows_changed,
            "cost_before_pico_usd": self.cost_before_pico,
            "cost_after_pico_usd": self.cost_after_pico,
            "unpriced_before": self.unpriced_before,
            "unpriced_after": self.unpriced_after,
            "sources_before": json.dumps(dict(sorted(self.sources_before.items()))),
            "sources_after": json.dumps(dict(sorted(self.sources_after.items()))),
        }


class _Change(NamedTuple):
    """One row's new price, and what it moves: the row's rollup key and counters."""

    row: Any
    new: tuple[Any, ...]  # the values of _PRICE_COLUMNS
    cost_delta: int
    unpriced_delta: int


# -- the run ---------------------------------------------------------------------------------


def recompute_prices(
    engine: Engine,
    book: PriceBook,
    scope: RecomputeScope,
    *,
    actor: str,
    dry_run: bool = False,
    batch_rows: int = BATCH_ROWS,
) -> str:
    """Reprice the rows of ``scope`` with ``book``; the id of the run's audit record.

    ``dry_run`` changes nothing but the audit record, which then holds the totals before and
    after. A run that fails midway leaves its committed batches (each complete and exact) and an
    audit record marked ``failed``; running it again finishes the work.
    """
    run_id = start_run(engine, book, scope, actor=actor, dry_run=dry_run)
    run_batches(engine, book, scope, run_id, dry_run=dry_run, batch_rows=batch_rows)
    return run_id


def run_batches(
    engine: Engine,
    book: PriceBook,
    scope: RecomputeScope,
    run_id: str,
    *,
    dry_run: bool = False,
    batch_rows: int = BATCH_ROWS,
    stop: threading.Event | None = None,
) -> None:
    """Do the work of the run ``start_run`` recorded (``recompute_prices`` is the two), batch
    by batch, and mark it ``done``; on an error, mark it ``failed`` and raise.

    ``stop`` set (the service is stopping): the run ends after the batch in flight, marked
    ``failed`` as interrupted, its committed batches complete; running it again finishes it.
    """
    totals = Totals()
    pricer, reader = _Pricer(book), _Reader(scope, batch_rows)
    try:
        cursor: tuple[datetime, str] | None = None
        while True:
            with engine.begin() as conn:
                cursor = _batch(conn, pricer, reader, cursor, totals, run_id, dry_run, batch_rows)
            if cursor is None:
                break
            if stop is not None and stop.is_set():
                _finish(engine, run_id, totals, "failed", INTERRUPTED)
                return
    except Exception as exc:
        _finish(engine, run_id, totals, "failed", f"{type(exc).__name__}: {exc}"[:2000])
        raise
    _finish(engine, run_id, totals, "done")


def start_run(
    engine: Engine, book: PriceBook, scope: RecomputeScope, *, actor: str, dry_run: bool
) -> str:
    """Record a run as ``running`` (and the book's price sources); its id."""
    now = datetime.now(UTC)
    run_id = new_id()
    with engine.begin() as conn:
        record_price_sources(conn, book.sources, now)
        conn.execute(
            _audit.insert().values(
                id=run_id,
                actor=actor[:100],
                started_at=now,
                status="running",
                dry_run=dry_run,
                since=scope.since,
                until=scope.until,
                model=scope.model,
                provider=scope.provider,
                price_sources=json.dumps([source.ref for source in book.sources]),
                **Totals().audit_values(),
            )
        )
    return run_id


def _finish(
    engine: Engine, run_id: str, totals: Totals, status: str, error: str | None = None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(_audit)
            .where(_audit.c.id == run_id)
            .values(
                status=status, error=error, finished_at=datetime.now(UTC), **totals.audit_values()
            )
        )


def describe_price_sources(engine: Engine, book: PriceBook) -> None:
    """Describe the book's sources in ``price_source`` at start, so the references on the rows
    it prices can be looked up; best effort (a database not yet reachable or migrated is left
    to the next start or the next recompute, which records them too)."""
    try:
        with engine.begin() as conn:
            record_price_sources(conn, book.sources, datetime.now(UTC))
    except SQLAlchemyError as exc:
        logger.warning("Could not record the price sources: %s", exc)


def record_price_sources(conn: Connection, sources: Iterable[PriceSource], now: datetime) -> None:
    """Describe each source in ``price_source`` (once: a known reference is left as it is)."""
    table = cast(Table, PriceSourceRow.__table__)
    rows = [
        {"ref": s.ref, "kind": s.kind, "version": s.version, "detail": s.detail, "first_seen": now}
        for s in sources
    ]
    if rows:
        insert = dialect_insert(conn.dialect.name)(table)
        conn.execute(insert.on_conflict_do_nothing(index_elements=["ref"]), rows)


# -- one batch -------------------------------------------------------------------------------


def _batch(
    conn: Connection,
    pricer: _Pricer,
    reader: _Reader,
    cursor: tuple[datetime, str] | None,
    totals: Totals,
    run_id: str,
    dry_run: bool,
    batch_rows: int,
) -> tuple[datetime, str] | None:
    """Reprice the next batch after ``cursor``; the new cursor, or None when none is left."""
    if not dry_run:
        _shut_out_writers(conn, run_id)
    rows = reader.read(conn, cursor)
    if not rows:
        return None
    changes = pricer.reprice(rows, totals)
    if changes and not dry_run:
        _write_rows(conn, changes)
        _apply_rollups(conn, changes)
        _apply_counters(conn, changes)
        _apply_task_metrics(conn, changes)
    # The run's progress, in the batch's transaction (a dry run's too: the API shows it).
    conn.execute(update(_audit).where(_audit.c.id == run_id).values(**totals.audit_values()))
    last = rows[-1]
    return (last.timestamp, last.id) if len(rows) == batch_rows else None


def _shut_out_writers(conn: Connection, run_id: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE llm_usage IN SHARE ROW EXCLUSIVE MODE"))
    else:  # a write first: SQLite's write lock, held to the commit, before any row is read
        conn.execute(update(_audit).where(_audit.c.id == run_id).values(status="running"))


def _select(scope: RecomputeScope, after_cursor: bool, limit: int, dialect: str) -> Any:
    """The next rows of ``scope`` in (timestamp, id) order, each with its ``row_key`` (SQLite's
    rowid: an update by it skips a search of the id index; the id on PostgreSQL); the values
    are bound by name (``until``, ``since``, ``model``, ``provider``, and the cursor's ``at``
    and ``last_id``)."""
    # Rows whose cost comes from tokens: successes, and errors that reported usage or output.
    costed = or_(_u.status == "success", and_(_u.status == "error", _u.is_partial.is_(True)))
    where = [costed, _u.timestamp < bindparam("until", type_=_u.timestamp.type)]
    if scope.since is not None:
        where.append(_u.timestamp >= bindparam("since", type_=_u.timestamp.type))
    if scope.model is not None:
        where.append(_u.model == bindparam("model", type_=_u.model.type))
    if scope.provider is not None:
        where.append(_u.provider == bindparam("provider", type_=_u.provider.type))
    if after_cursor:
        at = bindparam("at", type_=_u.timestamp.type)
        where += [_u.timestamp >= at, or_(_u.timestamp > at, _u.id > bindparam("last_id"))]
    row_key = literal_column("rowid") if dialect == "sqlite" else _u.id
    return (
        select(*_READ, row_key.label("row_key"))
        .where(*where)
        .order_by(_u.timestamp, _u.id)
        .limit(limit)
    )


_Row = namedtuple("_Row", [*(column.name for column in _READ), "row_key"])  # type: ignore[misc]


class _Reader:
    """Reads a run's batches as plain tuples: the statements compiled once, run on the DBAPI
    cursor (``app.core.prepared``), without SQLAlchemy's per-row result processing, which
    cost as much as the rest of a row's repricing."""

    def __init__(self, scope: RecomputeScope, limit: int) -> None:
        self._first = Statement(lambda dialect: _select(scope, False, limit, dialect))
        self._next = Statement(lambda dialect: _select(scope, True, limit, dialect))
        self._values: dict[str, Any] = {
            "until": scope.until,
            "since": scope.since,
            "model": scope.model,
            "provider": scope.provider,
        }

    def read(self, conn: Connection, cursor: tuple[datetime, str] | None) -> list[Any]:
        tx = Tx.of(conn)
        try:
            if cursor is None:
                raw = tx.execute(self._first, self._values).fetchall()
            else:
                values = {**self._values, "at": cursor[0], "last_id": cursor[1]}
                raw = tx.execute(self._next, values).fetchall()
        finally:
            tx.close()
        if conn.dialect.name == "sqlite":  # stored as text; the ledger's times are naive UTC
            parse, make = datetime.fromisoformat, _Row._make
            return [make((r[0], parse(r[1]), *r[2:])) for r in raw]
        return [_Row._make(r) for r in raw]


class _Pricer:
    """Prices rows as ``PriceBook.quote`` does, from integer rates worked out once per model,
    provider and service tier (``PriceBook.terms``): the same cost, status and provenance
    (``tests/prices/test_recompute_pricing.py`` sweeps it against ``quote``), without quoting
    each row. Rows whose prices vary in time get their terms at their own time; a price only
    genai-prices' calculation is exact for (or counts too large for the integer rates to be
    sure of) is quoted."""

    def __init__(self, book: PriceBook) -> None:
        self._book = book
        # (model, provider, service tier) -> terms valid at every time, or None: look per row.
        self._timeless: dict[tuple[str, str, str | None], QuoteTerms | None] = {}

    def _terms(self, row: Any) -> QuoteTerms | None:
        key = (row[2], row[3], row[18])
        try:
            terms = self._timeless[key]
        except KeyError:
            terms = self._book.terms(row[2], provider=row[3], at=row[1], service_tier=row[18])
            self._timeless[key] = terms if terms is not None and terms.timeless else None
            return terms
        if terms is None:
            return self._book.terms(row[2], provider=row[3], at=row[1], service_tier=row[18])
        return terms

    def _quote(self, row: Any, estimated: bool) -> tuple[Any, ...]:
        return self._book.quote(
            row[2],
            TokenUsage(row[8], row[9], row[10], row[11]),
            estimated=estimated,
            provider=row[3],
            at=row[1],
            service_tier=row[18],
        ).terms()

    def reprice(self, rows: Sequence[Any], totals: Totals) -> list[_Change]:
        """Count the rows in ``totals``; the changes of those whose price changes.

        Positional reads (``_READ``'s order) and locals: this runs once per row of the ledger.
        """
        changes: list[_Change] = []
        cost_before = cost_after = unpriced_before = unpriced_after = 0
        sources: Counter[tuple[str | None, str | None]] = Counter()
        terms_of, quote = self._terms, self._quote
        for row in rows:
            old = (row[12], row[13], row[15], row[16], row[17])  # _PRICE_COLUMNS
            new: tuple[Any, ...] = old
            flags = row[14] or ""
            if "absurd_tokens" not in flags:  # counts the live path refused to price
                estimated = "usage_missing" in flags
                terms = terms_of(row)
                priced = (
                    None
                    if terms is None
                    else terms.price(row[8], row[9], row[10], row[11], estimated)
                )
                new = quote(row, estimated) if priced is None else priced
            cost_before += old[0]
            cost_after += new[0]
            was_unpriced, is_unpriced = old[1] == "unpriced", new[1] == "unpriced"
            unpriced_before += was_unpriced
            unpriced_after += is_unpriced
            sources[(old[2], new[2])] += 1
            if new != old:
                changes.append(
                    _Change(row, new, new[0] - old[0], int(is_unpriced) - int(was_unpriced))
                )
        totals.rows_examined += len(rows)
        totals.rows_changed += len(changes)
        totals.cost_before_pico += cost_before
        totals.cost_after_pico += cost_after
        totals.unpriced_before += unpriced_before
        totals.unpriced_after += unpriced_after
        for (before, after), count in sources.items():
            totals.sources_before[before or "none"] += count
            totals.sources_after[after or "none"] += count
        return changes


def _write_rows(conn: Connection, changes: Sequence[_Change]) -> None:
    if conn.dialect.name == "postgresql":
        # One statement for the batch: the new values as arrays, joined to the rows by id.
        columns = ("id", *_PRICE_COLUMNS)
        transposed = zip(*((change.row.id, *change.new) for change in changes), strict=True)
        arrays = {name: list(values) for name, values in zip(columns, transposed, strict=True)}
        conn.execute(
            text(
                "UPDATE llm_usage AS u SET cost_pico_usd = v.cost_pico_usd, "
                "cost_status = v.cost_status, price_source = v.price_source, "
                "price_entry = v.price_entry, price_tier = v.price_tier "
                "FROM unnest(:id, :cost_pico_usd, :cost_status, :price_source, :price_entry, "
                ":price_tier) AS v(id, cost_pico_usd, cost_status, price_source, price_entry, "
                "price_tier) WHERE u.id = v.id"
            ).bindparams(
                bindparam("id", type_=postgresql.ARRAY(_u.id.type)),
                bindparam("cost_pico_usd", type_=postgresql.ARRAY(_u.cost_pico_usd.type)),
                *(
                    bindparam(name, type_=postgresql.ARRAY(_u[name].type))
                    for name in ("cost_status", "price_source", "price_entry", "price_tier")
                ),
            ),
            arrays,
        )
        return
    # SQLite: one prepared UPDATE run for every row by the driver (no per-row SQLAlchemy work).
    cursor = conn.connection.cursor()
    try:
        cursor.executemany(
            _SQLITE_UPDATE_ROW,
            [(*change.new, change.row.row_key) for change in changes],
        )
    finally:
        cursor.close()


_SQLITE_UPDATE_ROW = (  # _PRICE_COLUMNS, then the rowid (read in this transaction)
    "UPDATE llm_usage SET cost_pico_usd = ?, cost_status = ?, price_source = ?, "
    "price_entry = ?, price_tier = ? WHERE rowid = ?"
)


@contextmanager
def _pipelined(conn: Connection) -> Iterator[None]:
    """PostgreSQL: the statements of the block sent without waiting for each one's answer
    (psycopg's pipeline mode; errors are raised at the block's end, and roll the batch back);
    a network round trip per rollup statement would be most of a batch's time. SQLite: as is."""
    if conn.dialect.name != "postgresql":
        yield
        return
    with conn.connection.dbapi_connection.pipeline():  # type: ignore[union-attr]
        yield


def _apply_rollups(conn: Connection, changes: Sequence[_Change]) -> None:
    """The rows' differences summed per rollup key, applied in key order.

    A row's cost difference also moves the waste cost it counts in (an error's, a truncated
    answer's, a retried call's: ``writer.rollup_values``)."""
    deltas: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for change in changes:
        row = change.row
        key = (
            utc_day(row.timestamp), row.user_id or "", row.task_id or "", row.model,
            row.agent or "", row.provider, row.operation, utc_hour(row.timestamp),
        )  # fmt: skip
        delta = deltas[key]
        delta[0] += change.cost_delta
        delta[1] += change.unpriced_delta
        delta[2] += change.cost_delta if row.status == "error" else 0
        delta[3] += change.cost_delta if row.finish_reason == "length" else 0
        delta[4] += change.cost_delta if row.attempts > 1 else 0
    tx = Tx.of(conn)
    with _pipelined(conn):  # PostgreSQL: the upserts sent without a round trip each
        for key in sorted(deltas):
            cost, unpriced, error_cost, truncated_cost, retried_cost = deltas[key]
            if cost or unpriced:
                day, user_id, task_id, model, agent, provider, operation, hour = key
                apply_to_rollups(
                    tx,
                    {
                        "day": day, "user_id": user_id, "task_id": task_id, "model": model,
                        "agent": agent, "provider": provider, "operation": operation, "hour": hour,
                        "cost_pico_usd": cost, "unpriced_calls": unpriced,
                        "error_cost_pico_usd": error_cost,
                        "truncated_cost_pico_usd": truncated_cost,
                        "retried_cost_pico_usd": retried_cost,
                    },
                )  # fmt: skip


def _apply_counters(conn: Connection, changes: Sequence[_Change]) -> None:
    """The spend differences on the counters the spend trigger books a new row on."""
    per_call: Counter[tuple[str | None, str | None, date]] = Counter()
    for change in changes:
        if change.cost_delta:
            row = change.row
            per_call[(row.task_id, row.user_id, utc_day(row.timestamp))] += change.cost_delta
    deltas: Counter[CounterKey] = Counter()
    for (task_id, user_id, day), delta in per_call.items():
        deltas[CounterKey(BudgetScope.GLOBAL_DAILY, "", day)] += delta
        if task_id:
            deltas[CounterKey(BudgetScope.TASK, task_id, _TASK_WINDOW)] += delta
        if user_id:
            deltas[CounterKey(BudgetScope.USER_DAILY, user_id, day)] += delta
            deltas[CounterKey(BudgetScope.USER_MONTHLY, user_id, day.replace(day=1))] += delta
    # Only the counters that exist (few: a window gets one once a limit applies to it), found
    # in one read. None can appear before the commit: a counter is seeded only after taking
    # a lock this batch's own lock (or SQLite's write lock) excludes.
    subjects = sorted({key.subject_id for key in deltas})
    existing = {
        (scope, subject, window)
        for scope, subject, window in conn.execute(
            select(_counter.c.scope, _counter.c.subject_id, _counter.c.window_start).where(
                _counter.c.subject_id.in_(subjects)
            )
        )
    }
    moves = {
        key: (delta, 0)
        for key, delta in deltas.items()
        if delta and (key.scope.value, key.subject_id, key.window_start) in existing
    }
    if moves:
        apply_counter_deltas(Tx.of(conn), moves, datetime.now(UTC))


_METRIC_ID: Any = bindparam("metric_id")


def _apply_task_metrics(conn: Connection, changes: Sequence[_Change]) -> None:
    """A finished task's ``cost_usd`` metric and its day's rollup, moved by its difference."""
    per_task: Counter[str] = Counter()
    for change in changes:
        if change.row.task_id and change.cost_delta:
            per_task[change.row.task_id] += change.cost_delta
    if not per_task:
        return
    metrics_table = cast(Table, TaskMetrics.__table__)
    metrics = metrics_table.c
    daily = cast(Table, TaskMetricsDaily.__table__)
    found = conn.execute(
        select(metrics.id, metrics.task_id, metrics.metric_value, metrics.timestamp)
        .where(metrics.metric_name == COST_USD, metrics.task_id.in_(sorted(per_task)))
        .order_by(metrics.task_id)
    ).all()
    if not found:
        return
    per_day: Counter[date] = Counter()
    moved = []
    for metric_id, task_id, value, stamp in found:
        delta = per_task[task_id]
        new_value = Decimal(str(value)) + pico_to_usd(delta)
        moved.append({"metric_id": metric_id, "metric_value": new_value})
        per_day[utc_day(stamp)] += delta
    conn.execute(
        update(metrics_table)
        .where(metrics.id == _METRIC_ID)
        .values(metric_value=bindparam("metric_value", type_=metrics.metric_value.type)),
        moved,
    )
    for day in sorted(per_day):
        conn.execute(
            update(daily)
            .where(daily.c.day == day)
            .values(cost_pico_usd=daily.c.cost_pico_usd + per_day[day])
        )
