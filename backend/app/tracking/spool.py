"""A local append-only spool for usage rows the database could not take.

Each process appends JSON lines to its own file (fsync'd: this path only runs when the
database is down, so durability wins over speed). Replay takes an exclusive ``flock`` on a file,
inserts its rows idempotently (unique ``request_id``) and deletes it, so a row replayed twice,
or by two processes, is still counted once.

A row may carry its budget settlement (the reservation its call held, as the budget guard wrote
it: ``{"record": {...}, "settlement": {...}}``; a line without one is the record alone). The
replay settles it in the transaction that inserts the row, and only then: a row already in the
ledger was committed with its settlement (the line is a repeat, e.g. a file replayed again
after a crash between its commit and its deletion, or a row the writer process committed just
before it died), so settling it again would book a gateway key's spend twice. The exception is
marked ``"row_written": true``: the row committed but its settlement did not (the database
went away between the two), and the replay settles it although the row is not new.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.tracking.record import UsageRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Spooled:
    """One spooled line: a usage row and, if its call held a reservation, its settlement."""

    record: UsageRecord
    settlement: Mapping[str, Any] | None = None
    row_written: bool = False  # the row is in the ledger already; only the settlement is due


class UsageSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._path = directory / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"

    def append(
        self,
        record: UsageRecord,
        settlement: Mapping[str, Any] | None = None,
        *,
        row_written: bool = False,
    ) -> None:
        """Add the row (with its settlement, if any) durably to this process's file."""
        data_json: dict[str, Any] = record.to_json()
        if settlement is not None:
            data_json = {"record": data_json, "settlement": dict(settlement)}
            if row_written:
                data_json["row_written"] = True
        line = json.dumps(data_json, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    if not _same_file(fd, self._path):
                        continue  # a replayer took and deleted the file meanwhile; reopen
                    os.write(fd, data)
                    os.fsync(fd)
                    return
                finally:
                    os.close(fd)

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("spool-*.jsonl"))

    def pending(self) -> int:
        count = 0
        for path in self.files():
            try:
                with path.open("rb") as fh:
                    count += sum(1 for _ in fh)
            except FileNotFoundError:
                continue
        return count

    def replay(self, insert_batch: Callable[[list[Spooled]], None]) -> int:
        """Insert every spooled row through ``insert_batch``, one file (one transaction) at a
        time; returns how many were replayed.

        A file is deleted only after its batch committed; on failure it stays for next time.
        """
        replayed = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process (or an appender) holds it; next round
                records = list(_read_records(path))
                insert_batch(records)
                os.unlink(path)
                replayed += len(records)
            finally:
                os.close(fd)
        if replayed:
            logger.info("Replayed %d spooled usage rows", replayed)
        return replayed


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_records(path: Path) -> Iterable[Spooled]:
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if "record" in data:
                    yield Spooled(
                        UsageRecord.from_json(data["record"]),
                        data.get("settlement"),
                        row_written=data.get("row_written") is True,
                    )
                else:
                    yield Spooled(UsageRecord.from_json(data))
            except (ValueError, TypeError, KeyError):
                # A torn last line from a crash mid-write: the call never returned, skip it.
                logger.warning("Skipping unreadable spool line %s:%d", path.name, number)
