"""``python -m app.simulator --port 8100``: serve the simulator standalone on loopback.

The ``/sim/*`` control endpoints need ``Authorization: Bearer <token>``: a random token, printed
at start-up and, with ``--control-token-file PATH``, written to that file (mode 0600) for the
program that drives the simulator.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import uvicorn

from app.simulator.app import create_app
from app.simulator.config import SimulatorConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.simulator", description="OpenAI-compatible LLM simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--scripts", type=Path, default=None, help="JSON file of script rules")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--control-token-file",
        type=Path,
        default=None,
        help="write the /sim control token here (mode 0600)",
    )
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        latency_ms=args.latency_ms,
        stream_chunk_delay_ms=args.chunk_delay_ms,
        scripts_path=args.scripts,
    )
    token = secrets.token_urlsafe(32)
    if args.control_token_file is not None:
        fd = os.open(args.control_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
    print(f"Simulator control token (Authorization: Bearer ...): {token}", file=sys.stderr)
    uvicorn.run(
        create_app(config, control_token=token),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
