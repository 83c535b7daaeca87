"""The simulator as its own process, configured by a JSON ``SimulatorConfig`` on the command line.

    python rel_simulator.py '{"latency_ms": 20, "timeout_fault_seconds": 10}'

Like ``python -m app.simulator`` but on a port the OS picks, announced as the first line on
stdout (``{"event": "ready", "port": N, "control_token": T}``: ``T`` opens ``/sim/*``), and with
every ``SimulatorConfig`` field settable.
It lives in its own process so that killing the service does not take its counters with it.
"""

from __future__ import annotations

import json
import sys
import time

from app.simulator.config import SimulatorConfig
from app.simulator.server import SimulatorServer


def main() -> None:
    config = SimulatorConfig.model_validate(json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    server = SimulatorServer(config).start()
    ready = {"event": "ready", "port": server.port, "control_token": server.control_token}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        # Until the test closes our stdin (or kills us).
        while sys.stdin.readline():
            time.sleep(0.01)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
