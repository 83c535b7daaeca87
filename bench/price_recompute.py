"""How long repricing a large ledger takes (``app.prices.recompute``), and that it stays exact.

    cd backend
    .venv/bin/python ../bench/price_recompute.py --db sqlite:///data/bench-prices.db --rows 1000000
    .venv/bin/python ../bench/price_recompute.py \
        --db postgresql+psycopg://postgres@127.0.0.1:5432/prices_bench --rows 10000000

The ledger is seeded by ``bench/seed_usage.py`` (the database is recreated; ``--no-seed`` reuses
one; with ``--price-scale 2`` a rerun changes every row again), priced at its own synthetic
rates with no provenance. The run then reprices every row of
it with ``PRICE_OVERRIDES`` for its five models (the unpriced ``local-llama`` included), so every
costed row changes: the worst case, each row rewritten and its difference applied to the
rollups, the task metrics and the budget counters. A dry run (reads and quotes only) is timed
first (``--no-dry-run`` skips it; ``--last-days N`` reprices only the last N days;
``--pricing-only N`` times the per-row pricing alone, without a database). Afterwards
the script checks that each rollup's total cost equals the rows' sum. Prints
one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

BENCH = Path(__file__).resolve().parent
BACKEND = BENCH.parent / "backend"
sys.path.insert(0, str(BACKEND))

from app.core.db import create_db_engine  # noqa: E402
from app.core.money import usd_to_pico  # noqa: E402
from app.models import (  # noqa: E402
    LLMUsage,
    PriceRecompute,
    UsageRollupDaily,
    UsageRollupDailyOverall,
    UsageRollupUserDaily,
)
from app.prices.recompute import BATCH_ROWS, RecomputeScope, recompute_prices  # noqa: E402
from app.tracking.pricing import PriceBook, TokenUsage  # noqa: E402

# New prices for every seeded model (USD per million tokens).
OVERRIDES = {
    model: {"input_mtok": Decimal(i), "output_mtok": 4 * Decimal(i)}
    for model, i in (
        ("gpt-4o", "2.75"), ("gpt-4o-mini", "0.16"), ("gpt-4.1", "2.10"), ("o3-mini", "1.20"),
        ("local-llama", "0.05"),
    )
}  # fmt: skip


def seed(url: str, rows: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(BENCH / "seed_usage.py"), "--db", url, "--rows", str(rows)],
        cwd=BACKEND,
        check=True,
    )
    return time.perf_counter() - started


def totals(engine: object) -> dict[str, int]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        found = {
            table.__tablename__: int(conn.execute(select(func.sum(table.cost_pico_usd))).scalar())
            for table in (LLMUsage, UsageRollupDaily, UsageRollupUserDaily, UsageRollupDailyOverall)
        }
    return found


def pricing_only(rows: int) -> dict[str, object]:
    """Per-row pricing alone, no database: ``PriceBook.quote`` (what the recompute did per row)
    against ``PriceBook.terms`` (what it does now) on random calls of snapshot-priced models,
    at times over the last 90 days (OpenAI's prices are dated: terms are looked up per row)."""
    rng = random.Random(7)
    book = PriceBook()
    models = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "o3-mini", "claude-sonnet-4-5")
    provider = {model: book.resolve(model).provider for model in models}
    now = datetime.now(UTC)
    calls = []
    for _ in range(rows):
        prompt = rng.randint(1, 300_000)
        usage = TokenUsage(prompt, rng.randint(0, 2000), rng.randint(0, prompt))
        at = now - timedelta(seconds=rng.randint(0, 90 * 86400))
        calls.append((rng.choice(models), usage, at))
    started = time.perf_counter()
    quoted = [
        usd_to_pico(book.quote(m, u, provider=provider[m], at=at).cost_usd) for m, u, at in calls
    ]
    seconds_quote = time.perf_counter() - started
    started = time.perf_counter()
    priced = []
    for m, u, at in calls:
        terms = book.terms(m, provider=provider[m], at=at)
        assert terms is not None
        got = terms.price(u.prompt_tokens, u.completion_tokens, u.cached_tokens, 0, False)
        assert got is not None
        priced.append(got[0])
    seconds_terms = time.perf_counter() - started
    return {
        "rows": rows,
        "quote_us_per_row": round(seconds_quote / rows * 1e6, 2),
        "terms_us_per_row": round(seconds_terms / rows * 1e6, 2),
        "same_costs": quoted == priced,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pricing-only",
        type=int,
        metavar="ROWS",
        help="time per-row pricing alone (quote against terms) on ROWS random calls; no --db",
    )
    parser.add_argument("--db")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-seed", action="store_true", help="reuse the seeded database")
    parser.add_argument("--batch-rows", type=int, default=BATCH_ROWS)
    parser.add_argument("--no-dry-run", action="store_true", help="skip the timed dry run")
    parser.add_argument(
        "--last-days",
        type=int,
        help="reprice only the rows of the last N days (default: every row)",
    )
    parser.add_argument(
        "--price-scale",
        type=Decimal,
        default=Decimal(1),
        help="multiply the new prices (a rerun on a repriced ledger then changes every row)",
    )
    args = parser.parse_args()
    if args.pricing_only:
        print(json.dumps(pricing_only(args.pricing_only), indent=2))
        return
    if not args.db:
        parser.error("--db is required")

    seconds_seeding = None if args.no_seed else seed(args.db, args.rows)
    engine = create_db_engine(args.db)
    scale = args.price_scale
    book = PriceBook({m: {k: v * scale for k, v in p.items()} for m, p in OVERRIDES.items()})
    now = datetime.now(UTC)
    since = None if args.last_days is None else now - timedelta(days=args.last_days)
    scope = RecomputeScope(until=now + timedelta(days=1), since=since)
    with engine.connect() as conn:
        rows = int(conn.execute(select(func.count()).select_from(LLMUsage)).scalar())

    load_before = os.getloadavg()
    dry, seconds_dry = None, None
    if not args.no_dry_run:
        started = time.perf_counter()
        dry = recompute_prices(
            engine, book, scope, actor="bench", dry_run=True, batch_rows=args.batch_rows
        )
        seconds_dry = time.perf_counter() - started
    started = time.perf_counter()
    applied = recompute_prices(engine, book, scope, actor="bench", batch_rows=args.batch_rows)
    seconds_applied = time.perf_counter() - started
    load_after = os.getloadavg()

    with Session(engine) as session:
        run = session.get(PriceRecompute, applied)
    assert run is not None
    sums = totals(engine)
    engine.dispose()
    print(
        json.dumps(
            {
                "database": engine.dialect.name,
                "rows_in_ledger": rows,
                "rows_examined": run.rows_examined,
                "rows_changed": run.rows_changed,
                "batch_rows": args.batch_rows,
                "seconds_seeding": seconds_seeding and round(seconds_seeding, 1),
                "scope": "every row" if since is None else f"last {args.last_days} days",
                "seconds_dry_run": seconds_dry and round(seconds_dry, 1),
                "dry_run_rows_per_second": seconds_dry and round(run.rows_examined / seconds_dry),
                "seconds_recompute": round(seconds_applied, 1),
                "rows_per_second": round(run.rows_examined / seconds_applied),
                "rollups_equal_rows": len(set(sums.values())) == 1,
                "cost_delta_usd": str(
                    Decimal(run.cost_after_pico_usd - run.cost_before_pico_usd) / 10**12
                ),
                "dry_run_id": dry,
                "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
