"""Scenario 1: SIGTERM to the serving process during a steady stream of tracked calls, restart.

The service (``tests/support/service.py``) streams calls on four lanes (two plain, one streamed,
one async on the server's loop) and gets SIGTERM mid-stream; uvicorn shuts down gracefully, the
lifespan
drains the lanes (the calls in flight finish and are written) and disposes of the runtime, whose
last act is a final replay of the spool. To give that replay something to do, the database is
away for a moment before the signal (scenario 3's outage: rows go to the spool) and back just
before it, with ``SPOOL_REPLAY_INTERVAL_SECONDS=60`` so that the periodic replay cannot have
taken them first: the spool must be empty when the process has exited. A new service then
starts on the same database and spool and streams again, and the books are counted:

- every response the simulator completed reached a caller (the drain waited for it) and every
  call that returned has exactly one row: 0 lost, 0 duplicated;
- the simulator completed exactly as many responses as there are success rows, and the daily
  rollups count every row once;
- no budget reservation is left open but those of calls whose settlement met the outage, and
  those are reclaimed by the reservation TTL's sweep (run with a clock past the TTL): then
  nothing is reserved.

CI: one SIGTERM, on SQLite and PostgreSQL. Full (``ASA_RELIABILITY_FULL=1``): three cycles of 20 s
of stream, outage, recovery, SIGTERM, restart.
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
CYCLES = size(1, 3)
STREAM_SECONDS = size(1.0, 20.0)
CALLS_AFTER_RESTART = size(10, 100)  # per lane
SETTINGS = {
    "sqlite_busy_timeout_seconds": SQLITE_BUSY_TIMEOUT_SECONDS,
    "spool_replay_interval_seconds": 60,
}


def test_sigterm_mid_stream_then_restart_loses_and_duplicates_no_row(
    start_service: Any,
    outage: DatabaseOutage,
    ledger: Ledger,
    sim: SimulatorProcess,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    spool = tmp_path / "spool"
    exit_codes, spooled_before_sigterm, spooled_after_exit = [], [], []
    for cycle in range(CYCLES):
        service = start_service(outage.service_url, f"service-{cycle}", **SETTINGS)
        service.stream(f"c{cycle}", LANES)
        assert wait_until(lambda s=service: s.returned() >= 20, timeout=60)
        time.sleep(STREAM_SECONDS)
        outage.begin()
        assert wait_until(lambda: spooled_rows(spool) >= 3, timeout=30)
        outage.end()
        spooled_before_sigterm.append(spooled_rows(spool))
        exit_codes.append(service.terminate())
        spooled_after_exit.append(spooled_rows(spool))
    last = start_service(outage.service_url, "service-last", **SETTINGS)
    last.stream("last", LANES, max_calls=CALLS_AFTER_RESTART)
    assert wait_until(
        lambda: last.returned() >= CALLS_AFTER_RESTART * sum(LANES.values()), timeout=120
    )
    last.stop()

    entries = read_call_log(last.call_log)
    stats = sim.stats()
    count = ledger.count(entries, stats)
    figures.update(
        count.figures(),
        cycles=CYCLES,
        open_reservations_after_restart=ledger.open_reservations(),
        spooled_before_sigterm=spooled_before_sigterm,
        spooled_after_exit=spooled_after_exit,
    )

    # uvicorn re-raises the signal it caught once its graceful shutdown is done
    assert exit_codes == [-signal.SIGTERM] * CYCLES
    assert spooled_after_exit == [0] * CYCLES, "the shutdown did not replay the spool"
    assert count.returned_ok == count.returned > 0, "every call of the stream succeeds"
    assert count.lost == []
    assert count.duplicated == []
    assert count.unknown_ids == []
    assert {e["rid"] for e in entries} == set(stats["response_ids"])
    assert count.rows == count.returned == count.success_rows == stats["succeeded"]
    assert count.rollup_requests == count.overall_requests == count.rows
    # A call whose settlement met the outage keeps its reservation until the TTL reclaims it
    # (README: budgets); nothing else may be left open, and the sweep leaves nothing reserved.
    assert ledger.open_reservations() <= sum(LANES.values()) * CYCLES
    ledger.sweep_expired_reservations()
    assert (ledger.open_reservations(), ledger.reserved_pico()) == (0, 0)
