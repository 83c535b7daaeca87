"""Microbenchmark of the usage writer's per-call Python: the parameters of the six statements a
tracked call runs (the row and five rollups), ``rollup_values`` and ``row_values``; no database.

    cd backend && .venv/bin/python ../bench/hot_path.py [--number 20000]
"""

from __future__ import annotations

import argparse
import json
import timeit
import uuid
from datetime import UTC, datetime

from sqlalchemy.dialects import postgresql, sqlite

from app.tracking import writer
from app.tracking.record import UsageRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20000)
    n = parser.parse_args().number
    record = UsageRecord(
        request_id=uuid.uuid4().hex,
        model="gpt-4o-mini",
        status="success",
        task_id="task-1",
        user_id="user-1",
        agent="FixAgent",
        prompt_tokens=100,
        completion_tokens=20,
        cost_pico_usd=123_456,
        latency_ms=812.0,
        timestamp=datetime.now(UTC),
    )
    out: dict[str, float] = {}
    rollup, row = writer.rollup_values(record), writer.row_values(record)
    for name, dialect in (("sqlite", sqlite.dialect()), ("postgresql", postgresql.dialect())):
        compiled = [(writer.ADD_ROW.compiled(dialect), row)] + [
            (statement.compiled(dialect), rollup) for statement in writer.ROLLUP_STATEMENTS
        ]

        def params(compiled: list[tuple[object, dict[str, object]]] = compiled) -> None:
            for statement, values in compiled:
                statement.params(values)  # type: ignore[attr-defined]

        out[f"params_six_statements_{name}_us"] = timeit.timeit(params, number=n) / n * 1e6
    out["rollup_values_us"] = (
        timeit.timeit(lambda: writer.rollup_values(record), number=n) / n * 1e6
    )
    out["row_values_us"] = timeit.timeit(lambda: writer.row_values(record), number=n) / n * 1e6
    print(json.dumps({k: round(v, 2) for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
