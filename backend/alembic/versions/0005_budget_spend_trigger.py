"""budgets: the ledger books each call's spend on the budget counters that exist

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Written by hand.

An ``AFTER INSERT`` trigger on ``llm_usage`` adds the new row's cost to the counters of its
task, its user's UTC day and month, and the global UTC day, where those counter rows exist (a
counter exists once a limit has applied to its window; ``app.budgets.guard``). So whatever
writes a usage row books its spend in the same statement: the tracked call, the spool replayed
after an outage, a row written again after a failed settlement; settling a reservation only
releases it. Blocked and free rows (cost 0) book nothing.

PostgreSQL updates the four counters one statement at a time in the budget code's lock order
(task, user day, user month, global day), as reservations lock them, so the two never deadlock.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE_TRIGGER = """
CREATE TRIGGER llm_usage_books_budget_spend AFTER INSERT ON llm_usage
WHEN NEW.cost_pico_usd > 0
BEGIN
    UPDATE budget_counter
    SET spent_pico_usd = spent_pico_usd + NEW.cost_pico_usd, updated_at = NEW.timestamp
    WHERE (scope = 'task' AND subject_id = NEW.task_id AND window_start = '1970-01-01')
       OR (scope = 'user_daily' AND subject_id = NEW.user_id
           AND window_start = date(NEW.timestamp))
       OR (scope = 'user_monthly' AND subject_id = NEW.user_id
           AND window_start = date(NEW.timestamp, 'start of month'))
       OR (scope = 'global_daily' AND subject_id = ''
           AND window_start = date(NEW.timestamp));
END
"""

POSTGRES_FUNCTION = """
CREATE FUNCTION llm_usage_books_budget_spend() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    day date := (NEW.timestamp AT TIME ZONE 'UTC')::date;
BEGIN
    UPDATE budget_counter
    SET spent_pico_usd = spent_pico_usd + NEW.cost_pico_usd, updated_at = NEW.timestamp
    WHERE scope = 'task' AND subject_id = NEW.task_id AND window_start = DATE '1970-01-01';
    UPDATE budget_counter
    SET spent_pico_usd = spent_pico_usd + NEW.cost_pico_usd, updated_at = NEW.timestamp
    WHERE scope = 'user_daily' AND subject_id = NEW.user_id AND window_start = day;
    UPDATE budget_counter
    SET spent_pico_usd = spent_pico_usd + NEW.cost_pico_usd, updated_at = NEW.timestamp
    WHERE scope = 'user_monthly' AND subject_id = NEW.user_id
      AND window_start = date_trunc('month', day)::date;
    UPDATE budget_counter
    SET spent_pico_usd = spent_pico_usd + NEW.cost_pico_usd, updated_at = NEW.timestamp
    WHERE scope = 'global_daily' AND subject_id = '' AND window_start = day;
    RETURN NULL;
END
$$
"""

POSTGRES_TRIGGER = """
CREATE TRIGGER llm_usage_books_budget_spend AFTER INSERT ON llm_usage
FOR EACH ROW WHEN (NEW.cost_pico_usd > 0) EXECUTE FUNCTION llm_usage_books_budget_spend()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_FUNCTION)
        op.execute(POSTGRES_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS llm_usage_books_budget_spend ON llm_usage")
        op.execute("DROP FUNCTION IF EXISTS llm_usage_books_budget_spend()")
    else:
        op.execute("DROP TRIGGER IF EXISTS llm_usage_books_budget_spend")
