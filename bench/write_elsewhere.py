"""Experiment for issue 17: where does the tracked async throughput go, and would committing the
row in another process win it back? Not a product path: it swaps ``CallTracker.complete_async``
in this process only, budgets off (no reservation, no settlement).

Three ways of finishing a tracked call, each against the raw SDK in alternating rounds of 100
concurrent chat completions (``llm_overhead.concurrent_rounds``):

- ``thread``: the row committed by the tracking thread (``DbWorker``, ``TRACKING_WRITER=thread``;
  the product's default is now the writer process of ``app.tracking.write_process``, which
  this experiment led to: ``llm_overhead.py --compare-writers`` measures the two);
- ``process``: the row pickled to a writer process over a Unix socket, which commits each
  batch that arrived together (``writer.insert_new_usage``) and acknowledges it; the caller
  still waits for its commit;
- ``none``: no row written at all (metrics and span only): the ceiling.

    cd backend && .venv/bin/python ../bench/write_elsewhere.py --rounds 20 \
        --modes thread,process,none,thread,process,none
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from llm_overhead import (
    MESSAGES,
    MODEL,
    bench_runtime,
    concurrent_rounds,
    raw_clients,
    simulator_process,
)

from app.core.db import create_db_engine
from app.core.prepared import write_gate
from app.tracking import tracker
from app.tracking.llm_client import AsyncLLMClient
from app.tracking.record import UsageRecord
from app.tracking.writer import insert_new_usage

HEADER = struct.Struct("!IQ")  # body length, sequence number
ACK = struct.Struct("!Q")


def writer_process(path: str, url: str) -> None:
    """Commit what arrives, one transaction per read, and acknowledge each row."""
    gate = write_gate(create_db_engine(url))
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    conn, _ = server.accept()
    pending = b""
    while data := conn.recv(1 << 20):
        pending += data
        batch: list[tuple[int, UsageRecord]] = []
        while len(pending) >= HEADER.size:  # the rows are pickled by our own process
            size, seq = HEADER.unpack_from(pending)
            if len(pending) < HEADER.size + size:
                break
            batch.append((seq, pickle.loads(pending[HEADER.size : HEADER.size + size])))
            pending = pending[HEADER.size + size :]
        if batch:
            with gate.transaction() as tx:
                insert_new_usage(tx, [record for _, record in batch])
            conn.sendall(b"".join(ACK.pack(seq) for seq, _ in batch))


class WriterConnection:
    """The caller's side: send a row, wait for its acknowledgement."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seq = 0
        self.waiting: dict[int, asyncio.Future[None]] = {}

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        self.acks = asyncio.get_running_loop().create_task(self._read_acks())

    async def _read_acks(self) -> None:
        while True:
            (seq,) = ACK.unpack(await self.reader.readexactly(ACK.size))
            self.waiting.pop(seq).set_result(None)

    async def write(self, record: UsageRecord) -> None:
        self.seq += 1
        done = asyncio.get_running_loop().create_future()
        self.waiting[self.seq] = done
        body = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(HEADER.pack(len(body), self.seq) + body)
        await done


def measure(mode: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, simulator_process() as base_url:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        runtime = bench_runtime(
            url, base_url, Path(tmp), budget_enforcement=False, tracking_writer="thread"
        )
        _, raw = raw_clients(base_url)
        client = AsyncLLMClient(task_id="bench", user_id="bench", agent="bench", runtime=runtime)
        path = str(Path(tmp) / "writer.sock")
        writer = None
        if mode == "process":
            spawn = multiprocessing.get_context("spawn")
            writer = spawn.Process(target=writer_process, args=(path, url), daemon=True)
            writer.start()
            while not os.path.exists(path):
                time.sleep(0.05)
        original = tracker.CallTracker.complete_async

        async def run() -> dict[str, float]:
            if mode == "process":
                elsewhere = WriterConnection(path)
                await elsewhere.open()

                async def complete(self: Any, outcome: Any, _worker: Any) -> Any:
                    if not self._claim(outcome):
                        return None
                    await elsewhere.write(outcome.record)
                    self._observe_outcome(outcome)
                    return outcome.record

                tracker.CallTracker.complete_async = complete  # type: ignore[method-assign]
            elif mode == "none":

                async def complete_nothing(self: Any, outcome: Any, _worker: Any) -> Any:
                    if not self._claim(outcome):
                        return None
                    self._observe_outcome(outcome)
                    return outcome.record

                tracker.CallTracker.complete_async = complete_nothing  # type: ignore[method-assign]

            async def raw_call() -> Any:
                return await raw.chat.completions.create(messages=MESSAGES, model=MODEL)  # type: ignore[arg-type]

            async def tracked_call() -> Any:
                return await client.chat_completion(messages=MESSAGES, model=MODEL)

            return await concurrent_rounds((raw_call, tracked_call), 100, rounds)

        try:
            out = asyncio.run(run())
        finally:
            tracker.CallTracker.complete_async = original  # type: ignore[method-assign]
        with runtime.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT count(*) FROM llm_usage").scalar()
        runtime.close()
        if writer is not None:
            writer.terminate()
        return {
            "raw_round_ms": out["raw_round_ms"],
            "tracked_round_ms": out["tracked_round_ms"],
            "tracked_vs_raw_throughput": out["tracked_vs_raw_throughput"],
            "rows_written": rows,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--modes", default="thread,process,none")
    args = parser.parse_args()
    runs = [{"mode": mode, **measure(mode, args.rounds)} for mode in args.modes.split(",")]
    print(json.dumps({"runs": runs, "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
