"""Scenario 3: the database unavailable for a while during a steady stream of tracked calls.

PostgreSQL is made unreachable as if it were stopped: the service's ``DATABASE_URL`` goes through
a loopback TCP proxy (``tests.support.reliability.TcpProxy``) that stops listening and resets every
open connection, then listens again. SQLite is made unwritable as a backup or a long transaction
does
it: another process holds ``BEGIN EXCLUSIVE`` on the file; the service runs with
``SQLITE_BUSY_TIMEOUT_SECONDS=0.25`` so a write gives up after a quarter of a second and spools
its row (with the default 30 s each call would wait 30 s, several times, before doing the same).

Counted: the calls keep returning (all successfully) while the database is away, their rows go
to the spool, and once it is back every returned call has its row within seconds (the spool is
replayed every ``SPOOL_REPLAY_INTERVAL_SECONDS``, 2 s, the default); 0 lost, 0 duplicated.

CI: a 3 s outage. Full (``ASA_RELIABILITY_FULL=1``): a 30 s outage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.support.reliability import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    DatabaseOutage,
    Ledger,
    SimulatorProcess,
    read_call_log,
    size,
    spooled_rows,
    wait_until,
)

LANES = {"sync": 2, "stream": 1, "async": 1}
OUTAGE_SECONDS = size(3.0, 30.0)
RECOVERY_DEADLINE_SECONDS = 30.0


def test_calls_keep_working_while_the_database_is_away_and_rows_land_after(
    start_service: Any,
    outage: DatabaseOutage,
    ledger: Ledger,
    sim: SimulatorProcess,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    service = start_service(
        outage.service_url,
        sqlite_busy_timeout_seconds=SQLITE_BUSY_TIMEOUT_SECONDS,
        spool_replay_interval_seconds=2,
    )
    service.stream("outage", LANES)
    assert wait_until(lambda: service.returned() >= 20, timeout=60)

    before = service.returned()
    outage.begin()
    time.sleep(OUTAGE_SECONDS)
    during = service.returned() - before
    spooled = spooled_rows(tmp_path / "spool")
    outage.end()
    recovered_at = time.monotonic()

    def all_rows_landed() -> bool:
        return not ledger.count(read_call_log(service.call_log)).lost

    landed = wait_until(all_rows_landed, timeout=RECOVERY_DEADLINE_SECONDS, interval=0.1)
    landing_seconds = time.monotonic() - recovered_at
    service.drain()
    service.stop()

    entries = read_call_log(service.call_log)
    stats = sim.stats()
    count = ledger.count(entries, stats)
    budget_spent, _reserved = ledger.counter("global_daily")
    figures.update(
        count.figures(),
        # what the outage leaves the budgets (README: unmetered calls, reservations until TTL)
        ledger_cost_pico_usd=sum(row.cost_pico_usd for row in ledger.rows()),
        budget_spent_pico_usd=budget_spent,
        open_reservations=ledger.open_reservations(),
        outage_seconds=OUTAGE_SECONDS,
        calls_during_outage=during,
        lane_seconds_per_call_during_outage=round(
            OUTAGE_SECONDS * sum(LANES.values()) / max(during, 1), 2
        ),
        spooled_at_recovery=spooled,
        rows_landed_seconds_after_recovery=round(landing_seconds, 2),
    )

    assert during > 0, "calls stopped while the database was away"
    assert spooled > 0, "the outage was not seen: no row went to the spool"
    assert landed, f"rows still missing {RECOVERY_DEADLINE_SECONDS} s after the database came back"
    assert count.returned_ok == count.returned, "a call failed because the database was away"
    assert count.lost == []
    assert count.duplicated == []
    assert count.unknown_ids == []
    assert count.rows == count.returned == count.success_rows == stats["succeeded"]
    assert count.rollup_requests == count.overall_requests == count.rows
    assert spooled_rows(tmp_path / "spool") == 0
