"""The database tables, one module per domain; Alembic owns the schema (``backend/alembic``).

Importing this package registers every table on ``Base.metadata`` (what Alembic's autogenerate
compares against). The names below are the package's public surface: ``from app.models import
LLMUsage`` is a seed import path.
"""

from app.models.api_keys import NAME_MAX_CHARS, USER_ID_PATTERN, ApiKey
from app.models.base import NAMING_CONVENTION, Base, new_id, utcnow
from app.models.budgets import BudgetCounter, BudgetLimitOverride, BudgetReservation, BudgetScope
from app.models.notifications import (
    CHANNEL_KINDS,
    NotificationChannel,
    NotificationDelivery,
    NotificationEvent,
    NotificationSubscription,
)
from app.models.prices import PriceRecompute, PriceSourceRow
from app.models.rate_limits import RateLimitBucket
from app.models.tasks import (
    DURATION_BUCKETS_SECONDS,
    TASK_METRICS_BY_NAME_TIME,
    TASK_STATUSES,
    TERMINAL_TASK_STATUSES,
    Task,
    TaskEvent,
    TaskMetrics,
    TaskMetricsDaily,
)
from app.models.usage import (
    LATENCY_BUCKETS_MS,
    LLMUsage,
    RollupSums,
    TaskOutcome,
    TaskOutcomePart,
    TaskOutcomeRollupAgent,
    TaskOutcomeRollupPair,
    TaskOutcomeRollupRepo,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupHourly,
    UsageRollupTaskTotal,
    UsageRollupUserDaily,
)

__all__ = [
    "CHANNEL_KINDS",
    "DURATION_BUCKETS_SECONDS",
    "LATENCY_BUCKETS_MS",
    "NAME_MAX_CHARS",
    "NAMING_CONVENTION",
    "TASK_METRICS_BY_NAME_TIME",
    "TASK_STATUSES",
    "TERMINAL_TASK_STATUSES",
    "USER_ID_PATTERN",
    "ApiKey",
    "Base",
    "BudgetCounter",
    "BudgetLimitOverride",
    "BudgetReservation",
    "BudgetScope",
    "LLMUsage",
    "NotificationChannel",
    "NotificationDelivery",
    "NotificationEvent",
    "NotificationSubscription",
    "PriceRecompute",
    "PriceSourceRow",
    "RateLimitBucket",
    "RollupSums",
    "Task",
    "TaskEvent",
    "TaskMetrics",
    "TaskMetricsDaily",
    "TaskOutcome",
    "TaskOutcomePart",
    "TaskOutcomeRollupAgent",
    "TaskOutcomeRollupPair",
    "TaskOutcomeRollupRepo",
    "UsageRollupDaily",
    "UsageRollupDailyOverall",
    "UsageRollupHourly",
    "UsageRollupTaskTotal",
    "UsageRollupUserDaily",
    "new_id",
    "utcnow",
]
