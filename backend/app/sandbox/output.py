"""Reading a child's interleaved output until it exits, its deadline passes or it is cancelled,
in bounded memory: only the head and the tail of a flood are kept."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from typing import Protocol

_READ_CHUNK = 64 * 1024
_POLL_S = 0.1  # how often a quiet child is checked for exit, and ``cancel`` for being set


class Cancellation(Protocol):
    """What ``cancel`` may be: a ``threading.Event``, or anything else that says when it is set."""

    def is_set(self) -> bool: ...


class CappedOutput:
    """The head and the tail of a byte stream, never more than ``cap`` bytes in memory."""

    _NOTE = "\n[... {omitted} bytes of output omitted ...]\n"

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.head_cap = cap // 4
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        excess = len(self.tail) - (self.cap - self.head_cap)
        if excess > 0:
            del self.tail[:excess]

    def render(self) -> str:
        if not self.truncated:
            return (self.head + self.tail).decode("utf-8", errors="replace")
        kept_tail = self.cap - len(self.head) - len(self._NOTE) - 20  # room for the number
        omitted = self.total - len(self.head) - kept_tail
        note = self._NOTE.format(omitted=omitted)
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail[len(self.tail) - kept_tail :].decode("utf-8", errors="replace")
        return head + note + tail


def pump(
    process: subprocess.Popen[bytes],
    output: CappedOutput,
    deadline: float,
    cancel: Cancellation | None,
) -> str:
    """Copy the child's output into ``output`` until it exits: ``"exited"``, or ``"timeout"`` /
    ``"cancelled"`` if the deadline or ``cancel`` came first."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if cancel is not None and cancel.is_set():
                return "cancelled"
            if not selector.select(timeout=min(remaining, _POLL_S)):
                if has_exited(process):
                    # A background process may hold the pipe open forever; the command is done.
                    return "exited"
                continue
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if chunk:
                output.add(chunk)
                continue
            # End of output: everything that could write has closed the pipe.
            pause = 0.001
            while not has_exited(process):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                if cancel is not None and cancel.is_set():
                    return "cancelled"
                time.sleep(min(remaining, pause))
                pause = min(pause * 2, _POLL_S)
            return "exited"


def has_exited(process: subprocess.Popen[bytes]) -> bool:
    # WNOWAIT leaves the child a zombie, so its PID, which is also the process group's id,
    # cannot be reused before the caller has signalled the group.
    try:
        status = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped by someone else (a process-wide child watcher)
    return status is not None


def drain(process: subprocess.Popen[bytes], output: CappedOutput) -> None:
    """Keep what the killed processes wrote before they died, then close the pipe."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            output.add(chunk)
    except BlockingIOError:
        pass  # a writer outside the group still holds the pipe; stop here
    finally:
        process.stdout.close()
