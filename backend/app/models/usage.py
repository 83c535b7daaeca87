"""The ledger: one ``llm_usage`` row per LLM call, and its daily rollups.

The schema is Alembic's (``alembic/versions``)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.core.money import pico_to_usd
from app.models.base import Base, new_id, utcnow


class LLMUsage(Base):
    """One row per logical LLM call (SDK retries are counted in ``attempts``, not as rows)."""

    __tablename__ = "llm_usage"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    task_id: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(64))
    agent: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64), default="openai")  # gen_ai.provider.name
    operation: Mapped[str] = mapped_column(
        String(16),
        default="chat",
        server_default="chat",
        comment="The OpenAI API called: chat, responses or embeddings",
    )
    model: Mapped[str] = mapped_column(String(200))
    response_model: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(
        BigInteger, default=0, comment="Exact cost in USD x 10^12 (picodollars)"
    )
    cost_status: Mapped[str] = mapped_column(String(16), default="priced")
    # Price provenance (revision 0009): the compact reference of the price source (a row of
    # ``price_source``), the entry that matched and what chose among its prices; the service
    # tier the call ran in. NULL for unpriced rows and for rows older than the revision.
    price_source: Mapped[str | None] = mapped_column(String(40))
    price_entry: Mapped[str | None] = mapped_column(String(200))
    price_tier: Mapped[str | None] = mapped_column(String(64))
    service_tier: Mapped[str | None] = mapped_column(String(16))
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16))
    is_stream: Mapped[bool] = mapped_column(Boolean, default=False)
    is_partial: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[str | None] = mapped_column(String(200))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    span_id: Mapped[str | None] = mapped_column(String(16))
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_llm_usage_task_id_timestamp", "task_id", "timestamp"),
        Index("ix_llm_usage_user_id_timestamp", "user_id", "timestamp"),
        Index("ix_llm_usage_timestamp", "timestamp"),
    )

    @property
    def cost_usd(self) -> Decimal:
        return pico_to_usd(self.cost_pico_usd)


# Upper bounds (ms) of the latency buckets kept in the daily rollup; the last is +Inf.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
)  # fmt: skip


class RollupSums:
    """The additive columns every usage rollup carries (one definition for all rollup tables)."""

    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    blocked: Mapped[int] = mapped_column(BigInteger, default=0)
    unpriced_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    # Latency histogram: non-cumulative counts per LATENCY_BUCKETS_MS bucket; b14 is the overflow.
    lat_b00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b13: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b14: Mapped[int] = mapped_column(BigInteger, default=0)
    # Waste (revision 0016): the spend of failed calls (their count is ``errors``), of answers
    # cut at max_tokens (``finish_reason = 'length'``) and of calls the SDK retried
    # (``attempts > 1``; ``retry_attempts`` sums ``attempts - 1``: the extra requests sent).
    error_cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    truncated_calls: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    truncated_cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    retried_calls: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    retry_attempts: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    retried_cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageRollupDaily(RollupSums, Base):
    """Per-day aggregates, written in the same transaction as each usage row.

    Dimension columns use '' rather than NULL so the natural key is a plain unique constraint.
    ``provider`` and ``operation`` are '' only for calls older than revision 0008 whose rows
    retention had already pruned when it split the rollups by them (no source left to tell).
    """

    __tablename__ = "usage_rollup_daily"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    user_id: Mapped[str] = mapped_column(String(64), default="")
    task_id: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(200))
    agent: Mapped[str] = mapped_column(String(64), default="")
    provider: Mapped[str] = mapped_column(String(64), default="")
    operation: Mapped[str] = mapped_column(String(16), default="")

    __table_args__ = (
        UniqueConstraint(
            "day",
            "user_id",
            "task_id",
            "model",
            "agent",
            "provider",
            "operation",
            name="uq_usage_rollup_key",
        ),
        Index("ix_usage_rollup_daily_user_id_day", "user_id", "day"),
        Index("ix_usage_rollup_daily_task_id_day", "task_id", "day"),
    )


class UsageRollupDailyOverall(RollupSums, Base):
    """The daily rollup summed over users and tasks: one row per (UTC day, model, agent).

    ``usage_rollup_daily`` has a row per task, so a day of a busy service holds tens of
    thousands of them and "everyone's spend this month" would add up a million rows. This
    table answers it from ~20 rows a day. The usage writer increments it in the same
    transaction as the row and the per-task rollup, so the two always agree.
    """

    __tablename__ = "usage_rollup_daily_overall"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    model: Mapped[str] = mapped_column(String(200))
    agent: Mapped[str] = mapped_column(String(64), default="")
    provider: Mapped[str] = mapped_column(String(64), default="")
    operation: Mapped[str] = mapped_column(String(16), default="")

    __table_args__ = (
        UniqueConstraint(
            "day",
            "model",
            "agent",
            "provider",
            "operation",
            name="uq_usage_rollup_daily_overall_key",
        ),
    )


class UsageRollupUserDaily(RollupSums, Base):
    """The daily rollup summed over tasks and agents: one row per (user, UTC day, model,
    provider, operation).

    A user's month is ~150 rows here against one per task and agent in ``usage_rollup_daily``,
    and everyone's spend by user reads a row per user and day instead of one per task. Written
    by the usage writer in the same transaction as the row and the other rollups. ``user_id``
    is '' for calls made for no user.
    """

    __tablename__ = "usage_rollup_user_daily"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), default="")
    day: Mapped[date] = mapped_column(Date)
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(64), default="")
    operation: Mapped[str] = mapped_column(String(16), default="")

    __table_args__ = (
        # Starts with (user_id, day): a user's window is a range of the key itself.
        UniqueConstraint(
            "user_id",
            "day",
            "model",
            "provider",
            "operation",
            name="uq_usage_rollup_user_daily_key",
        ),
        Index("ix_usage_rollup_user_daily_day", "day"),  # everyone's, by user
    )


class UsageRollupTaskTotal(Base):
    """One row per task (calls of no task are not counted): its calls and cost over all time,
    the first and last UTC day it had calls, and its calls' user (the greatest user id).

    The overview's "top tasks" reads it in descending cost and stops after a few rows: a task's
    cost over some days is at most its total, and a task whose days all fall in the window
    costs its total there. Written by the usage writer with the other rollups (one upsert per
    call of a task, ``app.tracking.writer.apply_to_rollups``); never pruned.
    """

    __tablename__ = "usage_rollup_task_total"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(String(64), default="")
    first_day: Mapped[date] = mapped_column(Date)
    last_day: Mapped[date] = mapped_column(Date)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    # Revision 0017: a call (or a recompute's delta) reached the task after its outcome was
    # snapshot (``task_outcomes``); the recommendations correct it until
    # ``app.usage.outcomes.fold_late_outcomes`` folds it in and clears the flag.
    late: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index("ix_usage_rollup_task_total_cost_pico_usd", "cost_pico_usd"),
        Index(
            "ix_usage_rollup_task_total_late",
            "task_id",
            postgresql_where=text("late"),
            sqlite_where=text("late"),
        ),
    )


class UsageRollupHourly(Base):
    """Spend per (user, UTC hour, model): what the anomaly scan reads (revision 0016).

    Narrow on purpose (requests and cost only): the usage writer adds to it on every call, in
    the same transaction as the row and the daily rollups, through the same door
    (``app.tracking.writer.apply_to_rollups``), so a price recompute moves it too. ``hour`` is
    the start of the call's UTC hour; ``user_id`` is '' for calls made for no user. Never
    pruned: a day adds a row per active (user, model) and hour, far fewer than the daily
    per-task rollup.
    """

    __tablename__ = "usage_rollup_hourly"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), default="")
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(200))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        # Starts with (user_id, hour): a user's baseline is a range of the key itself.
        UniqueConstraint("user_id", "hour", "model", name="uq_usage_rollup_hourly_key"),
        Index("ix_usage_rollup_hourly_hour", "hour"),  # everyone's, by user and by model
    )


class TaskOutcome(Base):
    """A task that finished with an outcome (succeeded, failed, budget_exceeded or error), as
    it was when it finished: its owner, repository, model and total cost then (revision 0017).

    Written in the transaction that finishes the task (``app.usage.outcomes``); its cost and
    its ``TaskOutcomePart`` rows are what ``task_outcome_rollup_agent`` and
    ``task_outcome_rollup_repo`` hold for it. Calls that reach the task later flag its
    ``usage_rollup_task_total`` row ``late`` instead.
    """

    __tablename__ = "task_outcomes"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finish_day: Mapped[date] = mapped_column(Date)  # the UTC day of finished_at
    user_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))
    repo_url: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))  # the task's model
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        Index("ix_task_outcomes_user_id_finish_day", "user_id", "finish_day"),
        Index("ix_task_outcomes_finished_at", "finished_at"),
    )


class TaskOutcomePart(Base):
    """A finished task's spend per (agent, model the agent called), as it was when the task
    finished (revision 0017); ``agent`` is '' for calls of no agent, as in the daily rollup."""

    __tablename__ = "task_outcome_parts"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)


class TaskOutcomeRollupAgent(Base):
    """Finished tasks per (UTC day they finished, status, agent, model the agent called): how
    many had calls of that pair and what those calls cost (revision 0017). Everyone's
    recommendations read it; a few rows a day."""

    __tablename__ = "task_outcome_rollup_agent"

    finish_day: Mapped[date] = mapped_column(Date, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    agent: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    tasks: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)


class TaskOutcomeRollupRepo(Base):
    """Finished tasks per (repository, the task's model, UTC day they finished, status): how
    many (with calls or not) and their total cost (revision 0017). Rows of ``repo_url`` '*'
    (``ALL_REPOSITORIES``) sum every repository: a model's figures in a few rows a day."""

    __tablename__ = "task_outcome_rollup_repo"

    repo_url: Mapped[str] = mapped_column(Text, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    finish_day: Mapped[date] = mapped_column(Date, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    tasks: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_pico_usd: Mapped[int] = mapped_column(BigInteger, default=0)


class TaskOutcomeRollupPair(Base):
    """Finished tasks per (repository, the task's model) over all time (revision 0017): only a
    pair with at least ``min_tasks`` of them can have as many in a window, so the cheaper-model
    comparison reads the daily rows of those pairs only."""

    __tablename__ = "task_outcome_rollup_pair"

    repo_url: Mapped[str] = mapped_column(Text, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    tasks: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("ix_task_outcome_rollup_pair_tasks", "tasks"),)
