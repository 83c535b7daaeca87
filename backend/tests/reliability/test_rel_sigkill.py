"""Scenario 2: SIGKILL to the serving process during a stream of tracked calls, then restart.

Nothing runs at a SIGKILL: no drain, no final spool replay. What must hold is the promise made
to callers: a call that returned has its row, committed or in the fsync'd spool. To make the
spool part of it, the database is made unavailable (as in scenario 3) shortly before the kill,
so that the killed process leaves spooled rows behind; the database comes back, a new service
starts on the same spool directory and replays them.

Counted after the restart: every call that returned to its caller in the killed process (its
lane wrote the call log line after the call returned) has exactly one row; nobody has two; the
rows that exist beyond those (calls in flight at the kill whose row was written but whose caller
never saw the answer) are at most the lanes in flight, and never more success rows than the
simulator completed.

CI: one kill, on SQLite and PostgreSQL. Full (``ASA_RELIABILITY_FULL=1``): five kill/restart
cycles, after 10 s of stream each, the last three with the database away at the kill.
"""

from __future__ import annotations

import signal
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
# (seconds of stream before the kill, database away at the kill)
CYCLES = size([(1.0, True)], [(10.0, False), (10.0, False), (10.0, True), (10.0, True), (10, True)])
OUTAGE_BEFORE_KILL_SECONDS = size(2.0, 5.0)


def test_sigkill_mid_stream_every_returned_call_has_its_row_after_restart(
    start_service: Any,
    outage: DatabaseOutage,
    ledger: Ledger,
    sim: SimulatorProcess,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    settings = {"sqlite_busy_timeout_seconds": SQLITE_BUSY_TIMEOUT_SECONDS}
    spooled_at_kills = []
    for n, (seconds, database_away) in enumerate(CYCLES):
        service = start_service(outage.service_url, f"killed-{n}", **settings)
        service.stream(f"k{n}", LANES)
        assert wait_until(lambda s=service: s.returned() >= 20, timeout=60)
        time.sleep(seconds)
        if database_away:
            outage.begin()
            assert wait_until(lambda: spooled_rows(tmp_path / "spool") > 0, timeout=30)
            time.sleep(OUTAGE_BEFORE_KILL_SECONDS)
        service.sigkill()
        assert service.process.exitcode == -signal.SIGKILL
        spooled_at_kills.append(spooled_rows(tmp_path / "spool"))
        outage.end()

    restarted = start_service(outage.service_url, "restarted", **settings)
    replayed = wait_until(lambda: spooled_rows(tmp_path / "spool") == 0, timeout=30)
    restarted.stream("after", LANES, max_calls=5)
    assert wait_until(lambda: restarted.returned() >= 5 * sum(LANES.values()), timeout=60)
    restarted.stop()

    entries = read_call_log(restarted.call_log)
    stats = sim.stats()
    count = ledger.count(entries, stats)
    in_flight_at_kills = sum(LANES.values()) * len(CYCLES)
    figures.update(
        count.figures(),
        kills=len(CYCLES),
        spooled_at_kills=spooled_at_kills,
        # held by the calls in flight at a kill, until BUDGET_RESERVATION_TTL_SECONDS
        open_reservations_after_restart=ledger.open_reservations(),
    )

    assert any(spooled_at_kills), "no kill left rows in the spool: the replay was not tested"
    assert replayed, "the spool was not replayed after the restart"
    assert count.lost == []
    assert count.duplicated == []
    assert count.unknown_ids == []
    assert count.returned <= count.rows <= count.returned + in_flight_at_kills
    assert count.returned_ok <= count.success_rows <= stats["succeeded"]
    assert count.rollup_requests == count.overall_requests == count.rows
