"""``python -m app.simulator --port 8100``: serve the simulator standalone on loopback."""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        latency_ms=args.latency_ms,
        stream_chunk_delay_ms=args.chunk_delay_ms,
        scripts_path=args.scripts,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
