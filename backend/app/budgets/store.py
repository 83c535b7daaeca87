"""The budget SQL: counters, reservations and limit overrides (tables in ``app.models``).

Every function runs inside the caller's transaction and never commits. Writers touch counter
rows in ``CounterKey.lock_order`` so that concurrent transactions on PostgreSQL never deadlock;
the budget's writing transactions start with a write, so on SQLite each takes the database write
lock at once (waiting out ``busy_timeout``) and never has to upgrade a read snapshot.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Date,
    DateTime,
    Select,
    String,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from app.core.prepared import Statement, Tx, dialect_insert
from app.models import (
    BudgetCounter,
    BudgetLimitOverride,
    BudgetReservation,
    BudgetScope,
    UsageRollupDaily,
    UsageRollupDailyOverall,
)

_counter = cast(Table, BudgetCounter.__table__)
_reservation = cast(Table, BudgetReservation.__table__)
_override = cast(Table, BudgetLimitOverride.__table__)
_rollup = cast(Table, UsageRollupDaily.__table__)
_overall = cast(Table, UsageRollupDailyOverall.__table__)


_LOCK_RANK = {scope: rank for rank, scope in enumerate(BudgetScope)}


@dataclass(frozen=True, slots=True)
class CounterKey:
    """One counter row: a scope, its subject ('' for the global scope) and a window."""

    scope: BudgetScope
    subject_id: str
    window_start: date

    @property
    def lock_order(self) -> tuple[int, str, date]:
        return (_LOCK_RANK[self.scope], self.subject_id, self.window_start)

    def params(self) -> dict[str, Any]:
        return {
            "k_scope": self.scope.value,
            "k_subject": self.subject_id,
            "k_window": self.window_start,
        }


@dataclass(frozen=True, slots=True)
class CounterState:
    spent_pico: int = 0
    reserved_pico: int = 0
    soft_warned: bool = False


class CounterMissing(Exception):
    """A reservation needs a counter row that does not exist yet (``seed_counters`` makes it)."""

    def __init__(self, key: CounterKey) -> None:
        super().__init__(f"no budget counter for {key}")
        self.key = key


@dataclass(frozen=True, slots=True)
class OverrideLimit:
    """What the reserve path needs of an override: its limit (None: unlimited), its threshold."""

    limit_pico: int | None
    soft_threshold: Decimal | None


@dataclass(frozen=True, slots=True)
class OverrideRow:
    scope: BudgetScope
    subject_id: str
    limit_pico: int | None
    soft_threshold: Decimal | None
    updated_by: str | None
    updated_at: datetime


# -- statements -------------------------------------------------------------------------------
# Built once and precompiled (``app.core.prepared``): the hot path only binds parameters
# (building and executing a statement through SQLAlchemy cost more CPU than the database).

_c = _counter.c
_KEY = and_(
    _c.scope == bindparam("k_scope"),
    _c.subject_id == bindparam("k_subject"),
    _c.window_start == bindparam("k_window"),
)
_NOW = bindparam("now", type_=DateTime(timezone=True))
_AMOUNT = bindparam("amount", type_=BigInteger)
_CAP = bindparam("cap", type_=BigInteger)
_COUNTER_STATE = (_c.spent_pico_usd, _c.reserved_pico_usd, _c.soft_warned)

_reserve_unlimited = (
    update(_counter)
    .where(_KEY)
    .values(reserved_pico_usd=_c.reserved_pico_usd + _AMOUNT, updated_at=_NOW)
)
_RESERVE_UNLIMITED = Statement(_reserve_unlimited)
_RESERVE_WITHIN_CAP = Statement(
    _reserve_unlimited.where(_c.spent_pico_usd + _c.reserved_pico_usd + _AMOUNT <= _CAP)
)
_RESERVE_IF_ANY_LEFT = Statement(
    _reserve_unlimited.where(_c.spent_pico_usd + _c.reserved_pico_usd < _CAP)
)
_APPLY_DELTAS = Statement(
    update(_counter)
    .where(_KEY)
    .values(
        spent_pico_usd=_c.spent_pico_usd + bindparam("d_spent", type_=BigInteger),
        reserved_pico_usd=_c.reserved_pico_usd + bindparam("d_reserved", type_=BigInteger),
        updated_at=_NOW,
    )
    .returning(*_COUNTER_STATE)
)
_READ_COUNTER = Statement(select(*_COUNTER_STATE).where(_KEY))
_MARK_SOFT_WARNED = Statement(
    update(_counter).where(_KEY, _c.soft_warned.is_(False)).values(soft_warned=True)
)
_RESERVATION_COLUMNS = (
    "id", "amount_pico_usd", "task_id", "user_id", "window_day", "created_at", "expires_at",
    "key_id",
)  # fmt: skip
_INSERT_RESERVATION = Statement(insert(_reservation), column_keys=_RESERVATION_COLUMNS)
_DELETE_RESERVATION = Statement(delete(_reservation).where(_reservation.c.id == bindparam("r_id")))
# A reservation as ``ReservationRow`` reads it back, field by field.
_RESERVATION_ROW = (
    _reservation.c.id,
    _reservation.c.amount_pico_usd,
    _reservation.c.task_id,
    _reservation.c.user_id,
    _reservation.c.window_day,
    _reservation.c.key_id,
)
_READ_RESERVATION = Statement(
    select(*_RESERVATION_ROW).where(_reservation.c.id == bindparam("r_id"))
)


# The reserve path's lookup: a call has at most three subjects (its task, its user, and ''
# for the global scope), so a fixed IN list that precompiles.
def _override_pair(scope: BudgetScope, subject: Any) -> Any:
    return and_(_override.c.scope == literal(scope.value), _override.c.subject_id == subject)


_OVERRIDE_LIMITS = Statement(
    select(
        _override.c.scope,
        _override.c.subject_id,
        _override.c.limit_pico_usd,
        _override.c.soft_threshold,
    ).where(
        # Each pair on its own: the primary key (scope, subject_id) serves every one of them,
        # however many per-task overrides the table holds.
        or_(
            _override_pair(BudgetScope.TASK, bindparam("s_task")),
            _override_pair(BudgetScope.USER_DAILY, bindparam("s_user")),
            _override_pair(BudgetScope.USER_MONTHLY, bindparam("s_user")),
            _override_pair(BudgetScope.GLOBAL_DAILY, literal("")),
            _override_pair(BudgetScope.KEY, bindparam("s_key", value="")),  # a key's own budget
        )
    )
)


def _ledger_spend(scope: BudgetScope) -> Select[Any]:
    """What the usage rollups say a scope's subject spent in the window starting ``k_window``
    (ending before ``k_window_end``): the same ledger the usage API reads."""
    subject, window = bindparam("k_subject", type_=String), bindparam("k_window", type_=Date)
    if scope is BudgetScope.KEY:
        # The ledger does not record keys: a key's counter starts at 0 when its first limited
        # call makes it (a key's budget counts its spend from then on; set it when issuing).
        return select(literal(0, BigInteger))
    if scope is BudgetScope.GLOBAL_DAILY:
        return select(func.coalesce(func.sum(_overall.c.cost_pico_usd), 0)).where(
            _overall.c.day == window
        )
    spend = select(func.coalesce(func.sum(_rollup.c.cost_pico_usd), 0))
    if scope is BudgetScope.TASK:
        return spend.where(_rollup.c.task_id == subject)
    if scope is BudgetScope.USER_DAILY:
        return spend.where(_rollup.c.user_id == subject, _rollup.c.day == window)
    window_end = bindparam("k_window_end", type_=Date)
    return spend.where(
        _rollup.c.user_id == subject, _rollup.c.day >= window, _rollup.c.day < window_end
    )


def _seed_statement(scope: BudgetScope) -> Statement:
    ledger = _ledger_spend(scope).scalar_subquery()
    row = select(
        bindparam("k_scope", type_=String),
        bindparam("k_subject", type_=String),
        bindparam("k_window", type_=Date),
        ledger,
        literal(0, BigInteger),
        literal(False, Boolean),
        _NOW,
    )
    columns = [
        "scope", "subject_id", "window_start", "spent_pico_usd", "reserved_pico_usd",
        "soft_warned", "updated_at",
    ]  # fmt: skip
    return Statement(
        lambda dialect: (
            dialect_insert(dialect)(_counter)
            .from_select(columns, row.where(literal(True)))  # SQLite: INSERT..SELECT..ON CONFLICT
            .on_conflict_do_nothing()
        )
    )


_SEED_COUNTER = {scope: _seed_statement(scope) for scope in BudgetScope}
_LEDGER_SPEND = {scope: Statement(_ledger_spend(scope)) for scope in BudgetScope}
# Taken by a seeding transaction on PostgreSQL: it waits for every usage transaction in flight
# and holds new ones back until the counter exists, so a call's spend is either in the sum the
# counter starts from or added to the counter by the ledger's trigger (revision 0005).
_HOLD_ROLLUP_WRITERS = Statement(
    text("LOCK TABLE llm_usage, usage_rollup_daily, usage_rollup_daily_overall IN SHARE MODE")
)


# -- counters ---------------------------------------------------------------------------------


def _insert_ignore(conn: Connection, table: Any) -> postgresql.Insert | sqlite.Insert:
    return cast(postgresql.Insert | sqlite.Insert, dialect_insert(conn.dialect.name)(table))


def _window_params(key: CounterKey) -> dict[str, Any]:
    params = key.params()
    if key.scope is BudgetScope.USER_MONTHLY:
        start = key.window_start
        params["k_window_end"] = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return params


def seed_counters(tx: Tx, keys: Iterable[CounterKey], now: datetime) -> list[CounterKey]:
    """Create the missing counters among ``keys``, each starting from what the ledger says was
    spent in its window; the keys created. Run in a transaction of its own, before any counter
    row is locked (on PostgreSQL it first waits for the rollup writers in flight)."""
    missing = [key for key in keys if read_counter(tx, key) is None]
    if missing and tx.dialect.name == "postgresql":
        tx.execute(_HOLD_ROLLUP_WRITERS, {})
    for key in missing:
        tx.execute(_SEED_COUNTER[key.scope], {**_window_params(key), "now": now})
    return missing


def ledger_spend(conn: Tx | Connection, key: CounterKey) -> int:
    """What the ledger says ``key``'s subject spent in its window (for scopes with no counter)."""
    row = Tx.coerce(conn).execute(_LEDGER_SPEND[key.scope], _window_params(key)).fetchone()
    return int(row[0]) if row is not None else 0


def try_reserve(
    tx: Tx, key: CounterKey, amount_pico: int, limit_pico: int | None, now: datetime
) -> bool:
    """Add ``amount_pico`` to the key's reserved total if the limit allows it; True if added.

    One conditional UPDATE: the database re-checks ``spent + reserved + amount <= limit`` on the
    row it locks, so concurrent reservations can never pass the limit together. A zero amount
    (a model without a known price) passes only while something of the limit is left.
    """
    if limit_pico is None:
        stmt = _RESERVE_UNLIMITED
    else:
        stmt = _RESERVE_WITHIN_CAP if amount_pico > 0 else _RESERVE_IF_ANY_LEFT
    params = {**key.params(), "amount": amount_pico, "cap": limit_pico, "now": now}
    if limit_pico is None:
        del params["cap"]
    if tx.execute(stmt, params).rowcount == 1:
        return True
    if read_counter(tx, key) is None:
        raise CounterMissing(key)
    return False


def read_counter(conn: Tx | Connection, key: CounterKey) -> CounterState | None:
    row = Tx.coerce(conn).execute(_READ_COUNTER, key.params()).fetchone()
    if row is None:
        return None
    return CounterState(int(row[0]), int(row[1]), bool(row[2]))


def apply_counter_deltas(
    tx: Tx, deltas: Mapping[CounterKey, tuple[int, int]], now: datetime
) -> dict[CounterKey, CounterState]:
    """Add ``(spent, reserved)`` deltas to each counter, in lock order; the states after."""
    after: dict[CounterKey, CounterState] = {}
    if tx.dialect.name == "sqlite" and len(deltas) > 1 and len(set(deltas.values())) == 1:
        # One statement for all of a call's counters (the usual settle: the same spend on its
        # task, user and global windows). SQLite has one writer, so there is no lock order to
        # keep; PostgreSQL takes the rows one by one, in order, below.
        return _apply_same_delta(tx, list(deltas), *next(iter(deltas.values())), now)
    for key in sorted(deltas, key=lambda k: k.lock_order):
        spent, reserved = deltas[key]
        params = {**key.params(), "d_spent": spent, "d_reserved": reserved, "now": now}
        row = tx.execute(_APPLY_DELTAS, params).fetchone()
        if row is not None:  # no counter: nothing limits that window yet; the ledger has it
            after[key] = CounterState(int(row[0]), int(row[1]), bool(row[2]))
    return after


@functools.cache
def _same_delta_statement(keys: int) -> Statement:
    match = or_(
        *(
            and_(
                _c.scope == bindparam(f"k{i}_scope"),
                _c.subject_id == bindparam(f"k{i}_subject"),
                _c.window_start == bindparam(f"k{i}_window"),
            )
            for i in range(keys)
        )
    )  # OR of keys, not a row-value IN: SQLite searches the primary key for each
    return Statement(
        update(_counter)
        .where(match)
        .values(
            spent_pico_usd=_c.spent_pico_usd + bindparam("d_spent", type_=BigInteger),
            reserved_pico_usd=_c.reserved_pico_usd + bindparam("d_reserved", type_=BigInteger),
            updated_at=_NOW,
        )
        .returning(_c.scope, _c.subject_id, _c.window_start, *_COUNTER_STATE)
    )


def _apply_same_delta(
    tx: Tx, keys: list[CounterKey], spent: int, reserved: int, now: datetime
) -> dict[CounterKey, CounterState]:
    """The counters that exist, updated in one statement."""
    params: dict[str, Any] = {"d_spent": spent, "d_reserved": reserved, "now": now}
    by_row: dict[tuple[str, str, str], CounterKey] = {}
    for i, key in enumerate(keys):
        params[f"k{i}_scope"] = key.scope.value
        params[f"k{i}_subject"] = key.subject_id
        params[f"k{i}_window"] = key.window_start
        by_row[(key.scope.value, key.subject_id, key.window_start.isoformat())] = key
    rows = tx.execute(_same_delta_statement(len(keys)), params).fetchall()
    return {
        by_row[(scope, subject, str(window))]: CounterState(int(sp), int(rs), bool(warned))
        for scope, subject, window, sp, rs, warned in rows
    }


def mark_soft_warned(tx: Tx, key: CounterKey) -> bool:
    """Flag the window as warned; True only for the one transaction that flipped the flag."""
    return bool(tx.execute(_MARK_SOFT_WARNED, key.params()).rowcount == 1)


# -- reservations -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReservationRow:
    id: str
    amount_pico: int
    task_id: str | None
    user_id: str | None
    window_day: date
    key_id: str | None = None  # the gateway key whose ``key`` counter it also holds


def _reservation_values(
    row: ReservationRow, created_at: datetime, expires_at: datetime
) -> dict[str, Any]:
    return {
        "id": row.id,
        "amount_pico_usd": row.amount_pico,
        "task_id": row.task_id,
        "user_id": row.user_id,
        "window_day": row.window_day,
        "created_at": created_at,
        "expires_at": expires_at,
        "key_id": row.key_id,
    }


def insert_reservation(
    tx: Tx, row: ReservationRow, *, created_at: datetime, expires_at: datetime
) -> None:
    tx.execute(_INSERT_RESERVATION, _reservation_values(row, created_at, expires_at))


def insert_reservations(tx: Tx, rows: Sequence[tuple[ReservationRow, datetime, datetime]]) -> None:
    """``insert_reservation`` of each ``(row, created_at, expires_at)``, in one executemany."""
    if len(rows) == 1:
        insert_reservation(tx, rows[0][0], created_at=rows[0][1], expires_at=rows[0][2])
    elif rows:
        tx.execute_many(_INSERT_RESERVATION, [_reservation_values(*row) for row in rows])


def read_reservation(tx: Tx, reservation_id: str) -> ReservationRow | None:
    """The open reservation ``reservation_id`` (None: never taken, settled or reclaimed)."""
    row = tx.execute(_READ_RESERVATION, {"r_id": reservation_id}).fetchone()
    if row is None:
        return None
    window_day = row[4] if isinstance(row[4], date) else date.fromisoformat(row[4])
    return ReservationRow(row[0], int(row[1]), row[2], row[3], window_day, row[5])


def delete_reservation(tx: Tx, reservation_id: str) -> bool:
    """Remove an open reservation; False if it was already gone (expired and reclaimed)."""
    return bool(tx.execute(_DELETE_RESERVATION, {"r_id": reservation_id}).rowcount == 1)


def delete_expired_reservations(
    conn: Connection, now: datetime, limit: int
) -> list[ReservationRow]:
    """Remove up to ``limit`` reservations past their expiry and return them.

    Two sweepers never return the same reservation: the DELETE locks each row, and a row
    another transaction deleted first is skipped.
    """
    expired = (
        select(_reservation.c.id)
        .where(_reservation.c.expires_at < now)
        .order_by(_reservation.c.id)
        .limit(limit)
        .scalar_subquery()
    )
    stmt = (
        delete(_reservation)
        .where(_reservation.c.id.in_(expired), _reservation.c.expires_at < now)
        .returning(*_RESERVATION_ROW)
    )
    return [ReservationRow(r[0], int(r[1]), r[2], r[3], r[4], r[5]) for r in conn.execute(stmt)]


def prune_counters(
    conn: Connection, open_windows_from: Mapping[BudgetScope, date], *, task_idle_before: datetime
) -> int:
    """Delete the counters of closed windows: those of each scope starting before
    ``open_windows_from[scope]``, and the task counters (one window, the task's life) not
    updated since ``task_idle_before`` whose task holds no open reservation. How many."""
    closed = [
        and_(_c.scope == scope.value, _c.window_start < start)
        for scope, start in open_windows_from.items()
        if scope is not BudgetScope.TASK
    ]
    held = select(_reservation.c.id).where(_reservation.c.task_id == _c.subject_id).exists()
    idle_task = and_(_c.scope == BudgetScope.TASK.value, _c.updated_at < task_idle_before, ~held)
    return int(conn.execute(delete(_counter).where(or_(*closed, idle_task))).rowcount)


def count_open_reservations(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(_reservation)).scalar_one())


# -- limit overrides --------------------------------------------------------------------------


def _override_row(row: Any) -> OverrideRow:
    return OverrideRow(
        scope=BudgetScope(row.scope),
        subject_id=row.subject_id,
        limit_pico=None if row.limit_pico_usd is None else int(row.limit_pico_usd),
        soft_threshold=None if row.soft_threshold is None else row.soft_threshold.normalize(),
        updated_by=row.updated_by,
        updated_at=row.updated_at,
    )


def read_override_limits(
    tx: Tx, task_id: str | None, user_id: str | None, key_id: str | None = None
) -> dict[tuple[BudgetScope, str], OverrideLimit]:
    """The overrides that may apply to a call of this task, user and key, by (scope, subject)."""
    rows = tx.execute(
        _OVERRIDE_LIMITS,
        {"s_task": task_id or "", "s_user": user_id or "", "s_key": key_id or ""},
    ).fetchall()
    found: dict[tuple[BudgetScope, str], OverrideLimit] = {}
    for scope, subject, limit_pico, threshold in rows:
        if threshold is not None and not isinstance(threshold, Decimal):
            threshold = Decimal(str(threshold))  # SQLite hands NUMERIC back as a float
        found[(BudgetScope(scope), subject)] = OverrideLimit(
            None if limit_pico is None else int(limit_pico),
            None if threshold is None else threshold.normalize(),
        )
    return found


def read_overrides(
    conn: Connection, subjects: Iterable[tuple[BudgetScope, str]]
) -> dict[BudgetScope, OverrideRow]:
    """The overrides of the given ``(scope, subject)`` pairs, in one query."""
    wanted = set(subjects)
    if not wanted:
        return {}
    pairs = or_(
        *(
            and_(_override.c.scope == scope.value, _override.c.subject_id == subject)
            for scope, subject in sorted(wanted)
        )
    )  # by primary key, pair by pair
    return {o.scope: o for o in map(_override_row, conn.execute(select(_override).where(pairs)))}


def upsert_override(
    conn: Connection,
    scope: BudgetScope,
    subject_id: str,
    *,
    limit_pico: int | None,
    soft_threshold: Decimal | None,
    updated_by: str | None,
    now: datetime,
) -> None:
    values = {
        "limit_pico_usd": limit_pico,
        "soft_threshold": soft_threshold,
        "updated_by": updated_by,
        "updated_at": now,
    }
    stmt = (
        _insert_ignore(conn, _override)
        .values(scope=scope.value, subject_id=subject_id, **values)
        .on_conflict_do_update(index_elements=["scope", "subject_id"], set_=values)
    )
    conn.execute(stmt)


def delete_override(conn: Connection, scope: BudgetScope, subject_id: str) -> bool:
    result = conn.execute(
        delete(_override).where(
            _override.c.scope == scope.value, _override.c.subject_id == subject_id
        )
    )
    return bool(result.rowcount == 1)


def list_overrides(
    conn: Connection, scope: BudgetScope | None, *, limit: int, offset: int
) -> Sequence[OverrideRow]:
    stmt = select(_override).order_by(_override.c.scope, _override.c.subject_id)
    if scope is not None:
        stmt = stmt.where(_override.c.scope == scope.value)
    return [_override_row(r) for r in conn.execute(stmt.limit(limit).offset(offset))]
