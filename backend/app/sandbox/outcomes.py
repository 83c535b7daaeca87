"""Read a test run's verdict from its exit code and, where recognisable, its summary line.

pytest (``3 passed, 1 failed``) and unittest (``Ran 4 tests`` ... ``FAILED (failures=1)``) are
recognised; for anything else only the exit code counts. The summary starts with what the
sandbox did to the run, if anything: a timeout, or an aggregate cap it ran into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.sandbox.runner import RunResult

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?)\b")
_UNITTEST_RAN = re.compile(r"^Ran (\d+) tests? in", re.MULTILINE)
_UNITTEST_FAILED = re.compile(r"^FAILED \(([^)]*)\)", re.MULTILINE)
_SUMMARY_LINES = 25
_LIMIT_NOTES = {
    "memory": "[a process of the test command was killed: the task's memory cap was reached]",
    "processes": "[the test command could not start more processes: the task's cap was reached]",
}


@dataclass(frozen=True, slots=True)
class SuiteOutcome:
    __test__ = False  # not a pytest test class

    exit_code: int | None
    passed: int | None
    failed: int | None
    timed_out: bool
    summary: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def parse_outcome(run: RunResult) -> SuiteOutcome:
    passed, failed = _counts(run.output)
    tail = "\n".join(run.output.rstrip().splitlines()[-_SUMMARY_LINES:])
    notes = [_LIMIT_NOTES[limit] for limit in run.limits_hit if limit in _LIMIT_NOTES]
    if run.timed_out:
        notes.insert(0, f"[the test command timed out after {run.duration_s:.0f} s]")
    if notes:
        tail = "\n".join([*notes, tail])
    return SuiteOutcome(run.exit_code, passed, failed, run.timed_out, tail)


def _counts(output: str) -> tuple[int | None, int | None]:
    ran = _UNITTEST_RAN.findall(output)
    if ran:
        total = int(ran[-1])
        failed = 0
        verdict = _UNITTEST_FAILED.findall(output)
        if verdict:
            for part in verdict[-1].split(","):
                name, _, value = part.strip().partition("=")
                if name in ("failures", "errors") and value.isdigit():
                    failed += int(value)
        return total - failed, failed
    counts = {"passed": 0, "failed": 0, "error": 0}
    seen = False
    for value, kind in _PYTEST_COUNT.findall(output[-4000:]):
        counts["error" if kind.startswith("error") else kind] = int(value)
        seen = True
    if not seen:
        return None, None
    return counts["passed"], counts["failed"] + counts["error"]
