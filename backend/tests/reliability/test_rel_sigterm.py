"""Scenario 1: SIGTERM to the serving process during a steady stream of tracked calls, restart.

The service (``rel_service.py``) streams calls on four lanes (two plain, one streamed, one async
on the server's loop) and gets SIGTERM mid-stream; uvicorn shuts down gracefully, the lifespan
drains the lanes (the calls in flight finish and are written) and disposes of the runtime. A new
service starts on the same database and spool and streams again; then the books are counted:

- every response the simulator completed reached a caller (the drain waited for it) and every
  call that returned has exactly one row: 0 lost, 0 duplicated;
- the simulator completed exactly as many responses as there are success rows, and the daily
  rollups count every row once;
- no budget reservation is left open.

CI: one SIGTERM after ~2 s of stream, on SQLite and PostgreSQL. Full (``ASA_RELIABILITY_FULL=1``):
three SIGTERM/restart cycles after 20 s of stream each.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from rel_support import Ledger, SimulatorProcess, read_call_log, size, wait_until

LANES = {"sync": 2, "stream": 1, "async": 1}
CYCLES = size(1, 3)
STREAM_SECONDS = size(2.0, 20.0)
CALLS_AFTER_RESTART = size(10, 100)  # per lane


def test_sigterm_mid_stream_then_restart_loses_and_duplicates_no_row(
    start_service: Any,
    ledger_url: str,
    ledger: Ledger,
    sim: SimulatorProcess,
    figures: dict[str, Any],
) -> None:
    exit_codes = []
    for cycle in range(CYCLES):
        service = start_service(ledger_url, f"service-{cycle}")
        service.stream(f"c{cycle}", LANES)
        assert wait_until(lambda s=service: s.returned() >= 20, timeout=60)
        time.sleep(STREAM_SECONDS)
        exit_codes.append(service.terminate())
    last = start_service(ledger_url, "service-last")
    last.stream("last", LANES, max_calls=CALLS_AFTER_RESTART)
    assert wait_until(
        lambda: last.returned() >= CALLS_AFTER_RESTART * sum(LANES.values()), timeout=120
    )
    last.stop()

    entries = read_call_log(last.call_log)
    stats = sim.stats()
    count = ledger.count(entries, stats)
    figures.update(count.figures(), cycles=CYCLES, stream_seconds=STREAM_SECONDS)

    # uvicorn re-raises the signal it caught once its graceful shutdown is done
    assert exit_codes == [-signal.SIGTERM] * CYCLES
    assert count.returned_ok == count.returned > 0, "every call of a healthy stream succeeds"
    assert count.lost == []
    assert count.duplicated == []
    assert count.unknown_ids == []
    assert {e["rid"] for e in entries} == set(stats["response_ids"])
    assert count.rows == count.returned == count.success_rows == stats["succeeded"]
    assert count.rollup_requests == count.overall_requests == count.rows
    assert ledger.open_reservations() == 0
    assert ledger.reserved_pico() == 0
