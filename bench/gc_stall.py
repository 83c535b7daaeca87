"""How long one full garbage collection stalls a started service, with its start-up heap frozen
(what the service does once ready: ``app.core.heap``) and without.

A full collection runs on whatever thread allocates when CPython decides to run it, the event
loop's included; while it runs no request is served and no LLM call completes. Each variant
starts the real app (embedded SQLite, the built-in simulator, every background job) in a fresh
interpreter, serves a few requests, then times ``gc.collect()``:

    cd backend && .venv/bin/python ../bench/gc_stall.py [--runs 2] [--collections 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Any

SERVICE = r"""
import gc, json, sys, time
from fastapi.testclient import TestClient
import app.main
from app.core.config import Settings

if sys.argv[2] == "unfrozen":
    app.main.freeze_startup_heap = lambda: False  # the service as it was before app.core.heap
scratch, collections = sys.argv[1], int(sys.argv[3])
settings = Settings(
    database_url=f"sqlite:///{scratch}/asa.db", spool_dir=f"{scratch}/spool",
    openai_api_key="", examples_dir=f"{scratch}/examples",
)
with TestClient(app.main.create_app(settings)) as client:
    for _ in range(50):
        assert client.get("/health").status_code == 200
    times = []
    for _ in range(collections):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"times_ms": times, "objects_collections_visit": len(gc.get_objects()),
                      "objects_frozen": gc.get_freeze_count()}))
"""


def one(variant: str, collections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [sys.executable, "-c", SERVICE, scratch, variant, str(collections)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2, help="fresh services of each variant")
    parser.add_argument("--collections", type=int, default=7, help="timed per service")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        for variant in ("unfrozen", "frozen"):  # alternating: drift hits both alike
            result = one(variant, args.collections)
            runs.append(
                {
                    "variant": variant,
                    "full_collection_ms_median": round(statistics.median(result["times_ms"]), 2),
                    "objects_collections_visit": result["objects_collections_visit"],
                    "objects_frozen": result["objects_frozen"],
                }
            )
    print(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
