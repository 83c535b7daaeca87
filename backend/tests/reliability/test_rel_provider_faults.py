"""Scenario 5: provider faults from the simulator, accounted as the README documents.

Each call of the serving process carries its key in its user message, and a simulator script
for that key decides what each HTTP attempt gets: a 429 with ``Retry-After`` (1 s), a 500, an
answer held past the client's 1 s timeout, a body or a stream cut off mid-way. The SDK retries
(``OPENAI_MAX_RETRIES=2``) inside the logical call. Documented accounting, checked row by row:

- one ``llm_usage`` row per logical call, whatever the retries; ``attempts`` is the number of
  HTTP attempts, so the rows' attempts add up to the requests the simulator received;
- a call that got an answer in the end is ``success``; one that ran out of retries is ``error``
  with the SDK's exception type; a stream cut off after content is ``error``, flagged partial;
- the success rows' tokens are what the simulator billed (only the answering attempt is billed);
- every budget reservation is settled: none is open, nothing is reserved, and the global
  budget counter's spend equals the ledger's cost.

Tasks (submitted through the API, run by the service's task worker) whose agent calls meet the
same faults end in a clear state: ``succeeded`` after a retried 429, ``error`` naming the
provider's exception after three 500s or timeouts, ``budget_exceeded`` when the task's budget
cannot pay for one call; every task terminal, with a reason unless it succeeded.

CI: each plan once, four tasks. Full (``ASA_RELIABILITY_FULL=1``): each plan 20 times (200
calls, 16 at a time), the same tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.models import TERMINAL_TASK_STATUSES
from tests.support.reliability import Ledger, SimulatorProcess, size, wait_until

REPEAT = size(1, 20)
OK = {"content": "fine"}
SLOW_CHUNKS = {"x-sim-chunk-delay-ms": "20"}  # chunks arrive one by one, before the cut


@dataclass(frozen=True)
class Plan:
    """What each HTTP attempt of a call gets, and the row the call must leave."""

    replies: list[dict[str, Any]]
    status: str
    attempts: int
    error: str | None = None
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    partial: bool = False


PLANS = {
    "ok": Plan([OK], "success", 1),
    "429-then-ok": Plan([{"fault": "429"}, OK], "success", 2),
    "429-always": Plan([{"fault": "429"}], "error", 3, "RateLimitError"),
    "500-then-ok": Plan([{"fault": "500"}, OK], "success", 2),
    "500-always": Plan([{"fault": "500"}], "error", 3, "InternalServerError"),
    "timeout-then-ok": Plan([{"fault": "timeout"}, OK], "success", 2),
    "timeout-always": Plan([{"fault": "timeout"}], "error", 3, "APITimeoutError"),
    "truncated-body-then-ok": Plan([{"fault": "truncate"}, OK], "success", 2),
    "stream-ok": Plan([OK], "success", 1, stream=True),
    # the SDK does not retry a stream that broke after its 200: one attempt, an error row
    "truncated-stream": Plan(
        [{"fault": "truncate", "content": "word " * 50}],
        "error",
        1,
        "APIConnectionError",
        stream=True,
        headers=SLOW_CHUNKS,
        partial=True,
    ),
}
FIX = (
    "The mean divides by the number of values.\n\ncalculator.py\n<<<<<<< SEARCH\n"
    "    return sum(values) / (len(values) - 1)\n=======\n    return sum(values) / len(values)\n"
    ">>>>>>> REPLACE\n"
)
# task marker -> (FixAgent replies per attempt, max_cost_usd, expected status, reason contains)
TASKS: dict[str, tuple[list[dict[str, Any]], str | None, str, str | None]] = {
    "task-429": ([{"fault": "429"}, {"content": FIX}], None, "succeeded", None),
    "task-500": ([{"fault": "500"}], None, "error", "InternalServerError"),
    "task-timeout": ([{"fault": "timeout"}], None, "error", "APITimeoutError"),
    "task-budget": ([{"content": FIX}], "0.000001", "budget_exceeded", "budget"),
}
SETTINGS = {
    "openai_max_retries": 2,
    "openai_timeout_seconds": 1,
    "max_concurrent_tasks": 4,
    "task_poll_interval_seconds": 0.2,
    "task_submit_rate_per_minute": 0,
}


def _script(marker: str, replies: list[dict[str, Any]], **match: str) -> dict[str, Any]:
    return {"match_user": f"[{marker}]", "replies": replies, "after_last": "repeat", **match}


def test_every_attempt_is_accounted_budgets_are_released_and_tasks_end_clearly(
    start_service: Any,
    ledger_url: str,
    ledger: Ledger,
    sim: SimulatorProcess,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    calls = [
        {"key": f"{name}-{n}", "stream": plan.stream, "headers": plan.headers, "plan": name}
        for name, plan in PLANS.items()
        for n in range(REPEAT)
    ]
    sim.scripts([_script(c["key"], PLANS[c["plan"]].replies) for c in calls])
    sim.scripts(
        [
            _script(marker, replies, match_system="You are FixAgent")
            for marker, (replies, _, _, _) in TASKS.items()
        ]
    )
    service = start_service(ledger_url, **SETTINGS)

    # the tasks first: the worker runs them while the calls meet their faults
    task_ids = {
        marker: _submit(service.url, tmp_path, marker, max_cost)
        for marker, (_, max_cost, _, _) in TASKS.items()
    }
    results = service.calls(calls, concurrency=16)
    tasks: dict[str, dict[str, Any]] = {}

    def all_terminal() -> bool:
        for marker, task_id in task_ids.items():
            tasks[marker] = httpx.get(f"{service.url}/api/v1/task/{task_id}", timeout=10).json()
        return all(t["status"] in TERMINAL_TASK_STATUSES for t in tasks.values())

    terminal = wait_until(all_terminal, timeout=120, interval=0.5)
    service.stop()

    stats = sim.stats()
    rows = {row.task_id: row for row in ledger.rows()}
    by_key = ledger.rows_by_key()
    figures.update(
        calls=len(calls),
        sim_requests=stats["requests"],
        rows=len(rows),
        attempts=sum(r.attempts for r in rows.values()),
        faults={k: v for k, v in stats["faults"].items() if v},
        tasks={
            m: [t["status"], (t.get("result") or {}).get("failure_reason")]
            for m, t in tasks.items()
        },
    )

    # one row per logical call, attempts as the documented HTTP attempts
    for call, result in zip(calls, results, strict=True):
        plan = PLANS[call["plan"]]
        row = rows.get(call["key"])
        assert by_key[call["key"]] == 1, call
        assert row is not None
        assert (row.status, row.attempts, row.error_type) == (
            plan.status,
            plan.attempts,
            plan.error,
        ), call
        assert (result["ok"], result["error"]) == (plan.status == "success", plan.error), call
        assert row.is_partial == plan.partial, call
        if plan.partial:  # content arrived before the cut: billed, estimated
            assert row.cost_status == "estimated" and row.cost_pico_usd > 0
    assert sum(r.attempts for r in rows.values() if r.status != "blocked") == stats["requests"]
    success = [r for r in rows.values() if r.status == "success"]
    assert len(success) == stats["succeeded"]
    assert sum(r.prompt_tokens for r in success) == stats["billed_usage"]["prompt_tokens"]
    assert sum(r.completion_tokens for r in success) == stats["billed_usage"]["completion_tokens"]

    # budgets: every reservation settled, spend as in the ledger
    assert ledger.open_reservations() == 0
    assert ledger.reserved_pico() == 0
    spent, reserved = ledger.counter("global_daily")
    assert (spent, reserved) == (sum(r.cost_pico_usd for r in rows.values()), 0)

    # tasks: terminal, in the expected state, with a reason when they did not succeed
    assert terminal, {m: (t["status"], t.get("step")) for m, t in tasks.items()}
    for marker, (_replies, _cost, status, reason) in TASKS.items():
        task = tasks[marker]
        assert task["status"] == status, (marker, task)
        failure = (task.get("result") or {}).get("failure_reason") or ""
        if reason is None:
            assert not failure, (marker, task)
        else:
            assert reason.lower() in failure.lower(), (marker, task)


def _submit(url: str, tmp_path: Path, marker: str, max_cost_usd: str | None) -> str:
    body: dict[str, Any] = {
        "repo_url": str(tmp_path / "examples" / "buggy-calculator"),
        "bug_description": f"[{marker}] average() in calculator.py is wrong: "
        "average([2, 4, 6]) should be 4",
        "test_command": "python3 -m unittest -v",
    }
    if max_cost_usd is not None:
        body["max_cost_usd"] = max_cost_usd
    response = httpx.post(f"{url}/api/v1/task/submit", json=body, timeout=30)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id
