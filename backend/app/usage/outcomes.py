"""Finished tasks' outcomes and spend, kept so the recommendations never join tasks to usage.

A task that finishes with an outcome (``OUTCOME_STATUSES``; cancelled is none) is snapshot in
the transaction that sets its status (``record_task_outcome``): a ``task_outcomes`` row (its
owner, repository, model, status, UTC finish day and total cost from
``usage_rollup_task_total``) and its ``task_outcome_parts`` (its spend per agent and model the
agent called, from ``usage_rollup_daily``), added to the rollups everyone's recommendations
read: ``task_outcome_rollup_agent`` (per finish day, status, agent and model),
``task_outcome_rollup_repo`` (per repository, the task's model, finish day and status, and the
same over all repositories under ``ALL_REPOSITORIES``) and ``task_outcome_rollup_pair`` (per
repository and model, all time: only a pair with ``min_tasks`` tasks over all time can have as
many in a window, so the cheaper-model comparison reads only those pairs' rows; a month of a
busy service spans tens of thousands of pairs). They are not kept per user: a user's figures
are read from that user's ``task_outcomes`` and parts (a few hundred rows a month).

The snapshot can go stale: a call written after the task finished (a spool replay after an
outage, a gateway call tagged with a finished task) or a price recompute of old rows. Both go
through ``app.tracking.writer.apply_to_rollups``, whose per-task upsert sets the task's
``usage_rollup_task_total.late`` when an outcome exists for it, in the same statement. The
reads (``agent_outcome_sums``, ``repo_outcome_sums``, ``model_outcome_sums``) therefore
replace, in the same statement, the snapshot of every *suspect* task by its live figures:

- tasks flagged ``late`` (a partial index keeps them cheap to find);
- tasks finished in the last ``RECENT`` minutes. On PostgreSQL a writer's statement whose
  snapshot was taken before the finishing transaction committed does not see the new
  ``task_outcomes`` row, so it does not flag its call late; such a writer commits within
  seconds (its transaction is one call's), so re-reading every task finished in the last ten
  minutes closes that window. (The finishing transaction locks the task's total row first, so a
  writer that already holds it is waited for and its call is in the snapshot.)

``fold_late_outcomes`` (run by the notification dispatcher's insights scan) folds the late
tasks' live figures into the snapshot and the rollups and clears the flag, in short
transactions that lock the task's total row first, so the late set stays small and a late call
that races with the fold flags the task again.

May import ``app.core`` and ``app.models``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Date,
    Engine,
    cast,
    delete,
    exists,
    func,
    literal,
    select,
    tuple_,
    union,
    union_all,
    update,
)

from app.core.prepared import dialect_insert
from app.models import (
    Task,
    TaskOutcome,
    TaskOutcomePart,
    TaskOutcomeRollupAgent,
    TaskOutcomeRollupPair,
    TaskOutcomeRollupRepo,
    UsageRollupDaily,
    UsageRollupTaskTotal,
)

SUCCEEDED = "succeeded"
FAILED = ("failed", "budget_exceeded", "error")
OUTCOME_STATUSES = (SUCCEEDED, *FAILED)
ALL_REPOSITORIES = ""  # the rollup rows over all repositories: no task's (the API refuses "")
RECENT = timedelta(minutes=10)  # see the module docstring: PostgreSQL's finish race
FOLD_BATCH = 500

_outcome: Any = TaskOutcome.__table__
_part: Any = TaskOutcomePart.__table__
_agent: Any = TaskOutcomeRollupAgent.__table__
_repo: Any = TaskOutcomeRollupRepo.__table__
_pair: Any = TaskOutcomeRollupPair.__table__
_daily: Any = UsageRollupDaily.__table__
_total: Any = UsageRollupTaskTotal.__table__
_task: Any = Task.__table__
_AGENT_KEY = ("finish_day", "status", "agent", "model")
_REPO_KEY = ("repo_url", "model", "finish_day", "status")


def _utc_day(dialect: str, moment: Any) -> Any:
    """The UTC calendar day of a timezone-aware column, as each dialect stores it."""
    if dialect == "postgresql":
        return cast(func.timezone("UTC", moment), Date)
    return func.date(moment)


def _big(value: Any) -> Any:
    return cast(value, BigInteger)


def _add_to(dialect: str, table: Any, key: tuple[str, ...], rows: Any) -> Any:
    """``INSERT ... SELECT`` of (key, tasks, cost) rows added to ``table``'s sums."""
    stmt = dialect_insert(dialect)(table).from_select([*key, "tasks", "cost_pico_usd"], rows)
    return stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={
            "tasks": table.c.tasks + stmt.excluded.tasks,
            "cost_pico_usd": table.c.cost_pico_usd + stmt.excluded.cost_pico_usd,
        },
    )


# -- the snapshot at finish ---------------------------------------------------------------------


def _record(conn: Connection, task_ids: Sequence[str] | None) -> int:
    """Snapshot the finished outcome tasks (``task_ids``, or all) that have no outcome yet:
    their parts, both rollups, then their ``task_outcomes`` rows (last: until then the same
    condition picks the same tasks). The number of tasks recorded."""
    dialect = conn.dialect.name
    t = _task.alias("t")
    unrecorded = [
        t.c.status.in_(OUTCOME_STATUSES),
        t.c.finished_at.is_not(None),
        ~exists().where(_outcome.c.task_id == t.c.id),
    ]
    if task_ids is not None:
        unrecorded.append(t.c.id.in_(task_ids))
    day = _utc_day(dialect, t.c.finished_at)
    total = func.coalesce(_total.c.cost_pico_usd, 0)
    with_total = t.outerjoin(_total, _total.c.task_id == t.c.id)

    d = _daily
    parts = (
        select(d.c.task_id, d.c.agent, d.c.model, _big(func.sum(d.c.cost_pico_usd)))
        .select_from(d.join(t, t.c.id == d.c.task_id))
        .where(*unrecorded)
        .group_by(d.c.task_id, d.c.agent, d.c.model)
    )
    conn.execute(_part.insert().from_select(["task_id", "agent", "model", "cost_pico_usd"], parts))
    p = _part
    by_agent = (
        select(day, t.c.status, p.c.agent, p.c.model, _big(func.count()),
               _big(func.sum(p.c.cost_pico_usd)))
        .select_from(p.join(t, t.c.id == p.c.task_id))
        .where(*unrecorded)
        .group_by(day, t.c.status, p.c.agent, p.c.model)
    )  # fmt: skip
    conn.execute(_add_to(dialect, _agent, _AGENT_KEY, by_agent))
    for repo in (t.c.repo_url, literal(ALL_REPOSITORIES)):
        by_repo = (
            select(repo, t.c.model, day, t.c.status, _big(func.count()), _big(func.sum(total)))
            .select_from(with_total)
            .where(*unrecorded)
            .group_by(repo, t.c.model, day, t.c.status)
        )
        conn.execute(_add_to(dialect, _repo, _REPO_KEY, by_repo))
    pairs = (
        select(t.c.repo_url, t.c.model, _big(func.count()))
        .where(*unrecorded)
        .group_by(t.c.repo_url, t.c.model)
    )
    stmt = dialect_insert(dialect)(_pair).from_select(["repo_url", "model", "tasks"], pairs)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["repo_url", "model"],
            set_={"tasks": _pair.c.tasks + stmt.excluded.tasks},
        )
    )
    outcomes = (
        select(
            t.c.id, t.c.finished_at, day, t.c.user_id, t.c.status, t.c.repo_url, t.c.model, total
        )
        .select_from(with_total)
        .where(*unrecorded)
    )
    names = ["task_id", "finished_at", "finish_day", "user_id", "status", "repo_url", "model",
             "cost_pico_usd"]  # fmt: skip
    return int(conn.execute(_outcome.insert().from_select(names, outcomes)).rowcount)


def record_task_outcome(conn: Connection, task_id: str) -> bool:
    """Snapshot ``task_id``'s outcome, in the transaction that just set its finished status.

    Does nothing (False) when the task has no outcome status or is recorded already. On
    PostgreSQL the task's ``usage_rollup_task_total`` row is locked first: a call of the task
    being written holds it, and is then in the snapshot; one written after flags it late.
    """
    conn.execute(
        select(_total.c.task_id).where(_total.c.task_id == task_id).with_for_update()
    ).all()
    return _record(conn, [task_id]) > 0


def backfill_task_outcomes(conn: Connection) -> int:
    """Snapshot every finished outcome task that has none, as ``record_task_outcome`` would
    have at its finish: for tasks written without it (a seeded benchmark ledger, tests that
    insert finished tasks). Run it with the usage writers stopped. The number recorded."""
    return _record(conn, None)


# -- the late tasks' fold -----------------------------------------------------------------------


def _move_parts(conn: Connection, task_ids: Sequence[str], sign: int) -> None:
    """Add (``sign`` = 1) or take away (-1) the tasks' stored parts from the agent rollup."""
    o, p = _outcome, _part
    rows = (
        select(o.c.finish_day, o.c.status, p.c.agent, p.c.model, _big(sign * func.count()),
               _big(sign * func.sum(p.c.cost_pico_usd)))
        .select_from(p.join(o, o.c.task_id == p.c.task_id))
        .where(p.c.task_id.in_(task_ids))
        .group_by(o.c.finish_day, o.c.status, p.c.agent, p.c.model)
    )  # fmt: skip
    conn.execute(_add_to(conn.dialect.name, _agent, _AGENT_KEY, rows))


def _refold(conn: Connection, task_ids: Sequence[str]) -> None:
    """Replace the tasks' snapshot (parts, cost and their share of both rollups) by their live
    figures; their total rows are locked by the caller."""
    o, d = _outcome, _daily
    _move_parts(conn, task_ids, -1)
    conn.execute(delete(_part).where(_part.c.task_id.in_(task_ids)))
    live = (
        select(d.c.task_id, d.c.agent, d.c.model, _big(func.sum(d.c.cost_pico_usd)))
        .where(d.c.task_id.in_(task_ids), exists().where(o.c.task_id == d.c.task_id))
        .group_by(d.c.task_id, d.c.agent, d.c.model)
    )
    conn.execute(_part.insert().from_select(["task_id", "agent", "model", "cost_pico_usd"], live))
    _move_parts(conn, task_ids, 1)
    delta = func.coalesce(_total.c.cost_pico_usd, 0) - o.c.cost_pico_usd
    for repo in (o.c.repo_url, literal(ALL_REPOSITORIES)):
        rows = (
            select(repo, o.c.model, o.c.finish_day, o.c.status, _big(literal(0)),
                   _big(func.sum(delta)))
            .select_from(o.outerjoin(_total, _total.c.task_id == o.c.task_id))
            .where(o.c.task_id.in_(task_ids))
            .group_by(repo, o.c.model, o.c.finish_day, o.c.status)
        )  # fmt: skip
        conn.execute(_add_to(conn.dialect.name, _repo, _REPO_KEY, rows))
    live_total = (
        select(_total.c.cost_pico_usd).where(_total.c.task_id == o.c.task_id).scalar_subquery()
    )
    conn.execute(
        update(o)
        .where(o.c.task_id.in_(task_ids))
        .values(cost_pico_usd=func.coalesce(live_total, 0))
    )


def fold_late_outcomes(engine: Engine, batch: int = FOLD_BATCH) -> int:
    """Fold every late task's live figures into its snapshot and the outcome rollups, and
    clear its flag: ``batch`` tasks per transaction, each locking the tasks' total rows first
    (a call of them committing meanwhile is waited for and read; one after flags it again).
    The number of tasks folded."""
    folded = 0
    while True:
        with engine.begin() as conn:
            task_ids = list(
                conn.execute(
                    select(_total.c.task_id)
                    .where(_total.c.late)
                    .order_by(_total.c.task_id)
                    .limit(batch)
                    .with_for_update()
                ).scalars()
            )
            if task_ids:
                _refold(conn, task_ids)
                conn.execute(
                    update(_total).where(_total.c.task_id.in_(task_ids)).values(late=False)
                )
        folded += len(task_ids)
        if len(task_ids) < batch:
            return folded


# -- the exact reads ----------------------------------------------------------------------------


def _suspects(user_id: str | None, since: date, until: date, now: datetime) -> Any:
    """The window's outcome tasks whose snapshot may be stale (see the module docstring): the
    late ones (through the partial index) and the recent ones (through ``finished_at``'s)."""
    o, tt = _outcome, _total
    window = [o.c.finish_day >= since, o.c.finish_day <= until]
    if user_id is not None:
        window.append(o.c.user_id == user_id)
    columns = (o.c.task_id, o.c.status, o.c.repo_url, o.c.model, o.c.cost_pico_usd)
    late = (
        select(*columns)
        .select_from(tt.join(o, o.c.task_id == tt.c.task_id))
        .where(tt.c.late, *window)
    )
    recent = select(*columns).where(o.c.finished_at >= now - RECENT, *window)
    return union(late, recent).cte("suspects")


def _in_window(user_id: str | None, since: date, until: date) -> list[Any]:
    o = _outcome
    conditions = [o.c.finish_day >= since, o.c.finish_day <= until]
    if user_id is not None:
        conditions.append(o.c.user_id == user_id)
    return conditions


Sums = list[tuple[str, str, str, int, int]]


def _summed(conn: Connection, rows: Any) -> Sums:
    """(key, key, status, tasks, cost) summed over ``rows`` (five columns), the groups of no
    task left out."""
    first, second, status, tasks, cost = rows.subquery("rows").c
    query = (
        select(first, second, status, _big(func.sum(tasks)), _big(func.sum(cost)))
        .group_by(first, second, status)
        .having(func.sum(tasks) > 0)
    )
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in conn.execute(query)]


def agent_outcome_sums(conn: Connection, user_id: str | None, since: date, until: date) -> Sums:
    """(agent, model, status, tasks, cost) of the outcome tasks that finished on the UTC days
    ``since`` to ``until`` (inclusive), of ``user_id`` (None: everyone): per agent and model
    the agent called, how many of those tasks had calls of the pair and what they cost. As a
    join of the tasks to ``usage_rollup_daily`` would say, in one statement."""
    s = _suspects(user_id, since, until, datetime.now(UTC))
    o, p, d, a = _outcome, _part, _daily, _agent
    if user_id is None:
        base = select(a.c.agent, a.c.model, a.c.status, a.c.tasks, a.c.cost_pico_usd).where(
            a.c.finish_day >= since, a.c.finish_day <= until
        )
    else:
        base = (
            select(p.c.agent, p.c.model, o.c.status, _big(literal(1)), p.c.cost_pico_usd)
            .select_from(p.join(o, o.c.task_id == p.c.task_id))
            .where(*_in_window(user_id, since, until))
        )
    stale = select(
        p.c.agent, p.c.model, s.c.status, _big(literal(-1)), -p.c.cost_pico_usd
    ).select_from(p.join(s, s.c.task_id == p.c.task_id))
    live = (
        select(d.c.agent, d.c.model, s.c.status, _big(literal(1)),
               _big(func.sum(d.c.cost_pico_usd)))
        .select_from(d.join(s, s.c.task_id == d.c.task_id))
        .group_by(d.c.task_id, d.c.agent, d.c.model, s.c.status)
    )  # fmt: skip
    return _summed(conn, union_all(base, stale, live))


def _corrected_costs(s: Any, repo: Any) -> Any:
    """Each suspect task's live total less its snapshot, under ``repo``."""
    live = func.coalesce(_total.c.cost_pico_usd, 0)
    return select(
        repo, s.c.model, s.c.status, _big(literal(0)), _big(live - s.c.cost_pico_usd)
    ).select_from(s.outerjoin(_total, _total.c.task_id == s.c.task_id))


def repo_outcome_sums(
    conn: Connection, user_id: str | None, since: date, until: date, min_tasks: int = 0
) -> Sums:
    """(repository, model, status, tasks, cost) of the outcome tasks that finished on the UTC
    days ``since`` to ``until`` (inclusive), of ``user_id`` (None: everyone): every such task
    counted, its cost its total in ``usage_rollup_task_total`` (0 without calls). Only the
    (repository, model) pairs with at least ``min_tasks`` such tasks: for everyone, only the
    pairs with as many over all time are read (``task_outcome_rollup_pair``)."""
    s = _suspects(user_id, since, until, datetime.now(UTC))
    o, r, pair = _outcome, _repo, _pair
    if user_id is None:
        base = select(r.c.repo_url, r.c.model, r.c.status, r.c.tasks, r.c.cost_pico_usd).where(
            r.c.finish_day >= since, r.c.finish_day <= until, r.c.repo_url != ALL_REPOSITORIES
        )
        if min_tasks > 1:
            candidates = select(pair.c.repo_url, pair.c.model).where(pair.c.tasks >= min_tasks)
            base = base.where(tuple_(r.c.repo_url, r.c.model).in_(candidates))
    else:
        base = select(
            o.c.repo_url, o.c.model, o.c.status, _big(literal(1)), o.c.cost_pico_usd
        ).where(*_in_window(user_id, since, until))
    summed = _summed(conn, union_all(base, _corrected_costs(s, s.c.repo_url)))
    if min_tasks > 1:
        tasks: dict[tuple[str, str], int] = defaultdict(int)
        for repo, model, _status, count, _cost in summed:
            tasks[(repo, model)] += count
        summed = [row for row in summed if tasks[(row[0], row[1])] >= min_tasks]
    return summed


def model_outcome_sums(conn: Connection, user_id: str | None, since: date, until: date) -> Sums:
    """('*', model, status, tasks, cost): ``repo_outcome_sums`` over all repositories, for
    everyone from the rollup's few '*' rows a day."""
    s = _suspects(user_id, since, until, datetime.now(UTC))
    o, r = _outcome, _repo
    every = literal(ALL_REPOSITORIES)
    if user_id is None:
        base = select(r.c.repo_url, r.c.model, r.c.status, r.c.tasks, r.c.cost_pico_usd).where(
            r.c.repo_url == ALL_REPOSITORIES, r.c.finish_day >= since, r.c.finish_day <= until
        )
    else:
        base = select(every, o.c.model, o.c.status, _big(literal(1)), o.c.cost_pico_usd).where(
            *_in_window(user_id, since, until)
        )
    return _summed(conn, union_all(base, _corrected_costs(s, every)))
