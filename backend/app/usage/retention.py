"""Retention of raw usage rows: delete ``llm_usage`` rows older than N days, in batches.

The rollups (``usage_rollup_daily``, ``usage_rollup_user_daily``,
``usage_rollup_daily_overall``, the per-task totals and ``usage_rollup_hourly``) are never
pruned, so every usage report stays complete; only the per-call detail (export, error messages,
trace ids) goes. The cut-off is aligned to UTC days
like the reports' windows: ``older_than_days=N`` keeps the N whole UTC days ending today and
deletes everything before 00:00 UTC of today-(N-1).

With ``USAGE_RETENTION_DAYS`` set, the service prunes at start-up and daily by itself
(``RetentionScheduler``). Each batch is its own short transaction (locks are held briefly; an
interrupted run resumes where it stopped). It can also run from cron or a scheduler::

    cd backend && .venv/bin/python -m app.usage.retention --days 90 [--batch-size 10000]

The database is the one in ``DATABASE_URL`` (see ``.env.example``); ``--database-url`` overrides.
"""

from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from sqlalchemy import Engine, delete, select

from app.models import LLMUsage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: datetime
    deleted: int
    batches: int


def retention_cutoff(older_than_days: int, now: datetime) -> datetime:
    """00:00 UTC of the oldest day kept."""
    today = now.astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=older_than_days - 1), time(), UTC)


def prune_raw_usage(
    engine: Engine,
    older_than_days: int,
    batch_size: int = 10_000,
    *,
    now: datetime | None = None,
) -> PruneResult:
    """Delete raw usage rows from before the last ``older_than_days`` UTC days."""
    if older_than_days < 1:
        raise ValueError("older_than_days must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = retention_cutoff(older_than_days, now or datetime.now(UTC))
    u = LLMUsage
    oldest = (
        select(u.id).where(u.timestamp < cutoff).order_by(u.timestamp).limit(batch_size)
    ).scalar_subquery()
    deleted = batches = 0
    while True:
        with engine.begin() as conn:
            count = conn.execute(delete(u).where(u.id.in_(oldest))).rowcount
        deleted += count
        batches += 1
        if count < batch_size:
            break
    logger.info("Pruned %d raw usage rows older than %s", deleted, cutoff.isoformat())
    return PruneResult(cutoff=cutoff, deleted=deleted, batches=batches)


class RetentionScheduler:
    """Prunes raw rows at start-up and then every ``interval`` seconds, in a daemon thread."""

    def __init__(
        self, engine: Engine, older_than_days: int, batch_size: int, interval: float = 86_400.0
    ) -> None:
        self._engine = engine
        self._days = older_than_days
        self._batch_size = batch_size
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                prune_raw_usage(self._engine, self._days, self._batch_size)
            except Exception:
                logger.exception("Pruning raw usage rows failed; will retry")
            if self._stop.wait(self._interval):
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.usage.retention",
        description="Delete raw llm_usage rows older than N UTC days; daily rollups are kept.",
    )
    parser.add_argument("--days", type=int, required=True, help="keep this many UTC days")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--database-url", help="default: DATABASE_URL from the settings")
    args = parser.parse_args(argv)
    if args.days < 1 or args.batch_size < 1:
        parser.error("--days and --batch-size must be at least 1")

    from app.core.config import Settings, get_settings
    from app.core.db import create_db_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings(database_url=args.database_url) if args.database_url else get_settings()
    engine = create_db_engine(settings.database_url)
    try:
        result = prune_raw_usage(engine, args.days, args.batch_size)
    finally:
        engine.dispose()
    print(f"deleted {result.deleted} rows older than {result.cutoff.isoformat()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
