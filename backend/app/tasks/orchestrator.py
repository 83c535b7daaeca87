"""The orchestrator: from a queued task to a verified patch (or a clear reason why not).

clone → reproduce → (TestGenerator, when the suite passes) → FixAgent → CodeAgent → test, and
again with the failure fed back, up to ``max_attempts`` and within the task's budget. Success is
the test command exiting 0 with no fewer passing tests than before. The diff is kept whatever
the outcome (the best attempt's when none succeeds). Every LLM call goes through ``LLMClient``
with the task, the user and the agent; agent spans are children of one ``task`` span.

Repository commands run in the sandbox of :mod:`app.sandbox.runner`: under bubblewrap, or, where
it is missing, only for the local administrator of open mode (anyone else's task ends in
``error`` saying what to install). Test runs work on a private copy of the workspace, so the
diff, taken from the workspace after the agent's edits, is exactly those edits: nothing a test
run creates or changes is ever part of it. Cancelling (``cancelled``) or stopping (``stop``)
kills the command running at once; the task then ends, or goes back to the queue, at once.
With a ``worker_id`` every write is conditional on the task still being this worker's, so a
task the worker gave up on (requeued at shutdown, recovered elsewhere) is never overwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import openai
from opentelemetry import trace
from opentelemetry.trace import Tracer
from sqlalchemy import ColumnElement, CursorResult, Update, update
from sqlalchemy.orm import Session

from app.access.principal import LOCAL_USER
from app.agents.base import ModelChoice
from app.agents.code_agent import CodeAgent, existing_tests
from app.agents.fix_agent import FixAgent, FixRequest
from app.agents.regression_writer import RegressionTestWriter
from app.agents.repo_context import list_files
from app.core.errors import AppError
from app.core.money import pico_to_usd
from app.core.runtime import Runtime
from app.models import Task
from app.notifications.events import task_finished_event  # issue 16
from app.notifications.outbox import record_event  # issue 16
from app.observability import TASK_DURATION, TASK_SUCCESS
from app.sandbox.bwrap import INSTALL_HINT, SandboxPolicy
from app.sandbox.outcomes import SuiteOutcome, parse_outcome
from app.sandbox.runner import (
    InvalidTestCommand,
    Isolation,
    RunResult,
    detect_isolation,
    parse_test_command,
    run_sandboxed,
)
from app.sandbox.workspace import (
    CloneError,
    InvalidGitRef,
    InvalidRepoURL,
    Workspace,
    clone_repository,
)
from app.tasks import store as task_store
from app.tasks.metrics_writer import fix_attempt_step
from app.usage.outcomes import OUTCOME_STATUSES, record_task_outcome

logger = logging.getLogger(__name__)
_GIT_HARDENING = (
    *("-c", "core.hooksPath=/dev/null"),
    *("-c", "core.fsmonitor=false"),
    *("-c", "user.name=ASA"),
    *("-c", "user.email=asa@localhost"),
    *("-c", "commit.gpgsign=false"),
)


class TaskCancelled(Exception):
    """The task was cancelled by its owner."""


class TaskInterrupted(Exception):
    """The worker is shutting down; the task goes back to the queue."""


class TaskBudgetExhausted(Exception):
    """The task's budget cannot pay for another LLM call."""


class TestCommandUnusable(Exception):
    """The test command cannot be started in the sandbox (its program is not there)."""

    __test__ = False  # not a pytest test class


@dataclass
class Attempt:
    diff: str
    outcome: SuiteOutcome | None


@dataclass
class RunState:
    before: SuiteOutcome | None = None
    after: SuiteOutcome | None = None
    best: Attempt | None = None
    attempts: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class _AgentArgs(TypedDict):
    task_id: str
    user_id: str
    model: ModelChoice


class _Abort:
    """Set when the task is cancelled or the worker stops: what a running command polls."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


class Orchestrator:
    """Runs one claimed task to a terminal status.

    ``stop`` (the worker is shutting down) and ``cancelled`` (the owner cancelled) kill the
    command running and end the task at once; between commands they are checked at each step.
    """

    def __init__(
        self,
        runtime: Runtime,
        task_id: str,
        *,
        stop: threading.Event | None = None,
        tracer: Tracer | None = None,
        worker_id: str | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.task_id = task_id
        self.stop = stop or threading.Event()
        self.cancelled = threading.Event()
        self.worker_id = worker_id
        self._abort = _Abort(self.stop, self.cancelled)
        self._isolation = isolation
        self._tracer = tracer or trace.get_tracer("app.tasks.orchestrator")
        self._choice: ModelChoice | None = None
        # The last test run's whole output: FixAgent localizes from every frame, not the tail.
        self._last_output = ""
        s = self.settings
        self._policy = SandboxPolicy(
            toolchain=tuple(s.sandbox_ro_paths) if s.sandbox_ro_paths is not None else None,
            tmp_mb=s.sandbox_tmp_mb,
            disk_mb=s.task_disk_mb,
            max_processes=s.task_max_processes,
        )

    def _agent_args(self, task: Task) -> _AgentArgs:
        return {"task_id": task.id, "user_id": task.user_id, "model": self._model_choice(task)}

    def _model_choice(self, task: Task) -> ModelChoice:
        """The task's model, shared by its agents (one switch to the fallback for all)."""
        if self._choice is None:
            self._choice = ModelChoice(task.model, task.fallback_model, self._model_switched)
        return self._choice

    def _model_switched(self, model: str, fallback: str, reason: str) -> None:
        """Budget-aware model choice (issue 16): recorded in the task's row and events."""
        with self.runtime.session_factory() as session, session.begin():
            session.execute(
                update(Task).where(*self._owned()).values(model_switched_at=task_store.now())
            )
            task_store.add_event(
                session, self.task_id, "model_switch", f"{model} -> {fallback}: {reason}"
            )

    # -- state helpers ----------------------------------------------------------------------

    def _load(self) -> Task:
        with self.runtime.session_factory() as session:
            task = session.get(Task, self.task_id)
            if task is None:
                raise LookupError(self.task_id)
            session.expunge(task)
            return task

    def _owned(self) -> list[ColumnElement[bool]]:
        """The condition of every write: the task is still this worker's (when it has one)."""
        if self.worker_id is None:
            return [Task.id == self.task_id]
        return [Task.id == self.task_id, Task.worker_id == self.worker_id]

    def _step(self, step: str, message: str | None = None, **values: object) -> None:
        """Record progress; raise if the task was cancelled or the worker is stopping (or no
        longer has the task)."""
        with self.runtime.session_factory() as session, session.begin():
            done = _execute(session, update(Task).where(*self._owned()).values(step=step, **values))
            if done.rowcount == 0:
                self.stop.set()  # not ours any more: stop quietly
            else:
                task_store.add_event(session, self.task_id, "step", message or step)
        self._checkpoint()

    def _checkpoint(self) -> None:
        if self.cancelled.is_set():
            raise TaskCancelled
        if self.stop.is_set():
            raise TaskInterrupted

    def _spent_pico(self) -> int:
        with self.runtime.session_factory() as session:
            return task_store.task_spend(session, [self.task_id]).get(self.task_id, (0, 0))[0]

    def _ensure_budget(self, task: Task) -> None:
        """Stop when the cap is already spent. The budget guard (when enforcement is on) also
        refuses any call whose worst case no longer fits, before it reaches the provider."""
        if task.max_cost_pico_usd is not None and self._spent_pico() >= task.max_cost_pico_usd:
            raise TaskBudgetExhausted

    # -- the pipeline -----------------------------------------------------------------------

    def run(self) -> str:
        """Execute the task; returns its final status ('queued' again if interrupted)."""
        task = self._load()
        started = time.monotonic()
        state = RunState()
        with self._tracer.start_as_current_span(f"task {task.id}") as span:
            span.set_attributes(
                {"asa.task_id": task.id, "asa.user_id": task.user_id, "llm.model": task.model}
            )
            try:
                status, reason = self._pipeline(task, state)
            except TaskInterrupted:
                self._requeue()
                return "queued"
            except TaskCancelled:
                status, reason = "cancelled", "Cancelled by request"
            except TaskBudgetExhausted:
                status, reason = (
                    "budget_exceeded",
                    "The task's budget ran out; the best diff is kept",
                )
            except AppError as exc:
                if exc.code == "budget_exceeded":
                    status, reason = "budget_exceeded", exc.detail
                else:
                    status, reason = "error", exc.detail
            except openai.OpenAIError as exc:
                # The provider failed (after the SDK's retries); an expected condition, not a bug.
                logger.warning(
                    "Task %s stopped on an LLM provider error: %s", task.id, type(exc).__name__
                )
                status, reason = (
                    "error",
                    f"LLM provider error ({type(exc).__name__}); see the task's usage rows",
                )
            except Exception as exc:
                logger.exception("Task %s failed unexpectedly", task.id)
                status, reason = "error", f"Internal error: {type(exc).__name__}"
            span.set_attribute("asa.task_status", status)
        self._finish(task, state, status, reason, time.monotonic() - started)
        return status

    def _pipeline(self, task: Task, state: RunState) -> tuple[str, str | None]:
        with self.runtime.session_factory() as session:
            admin = task_store.submitted_by_admin(session, task)
        isolation = self._isolation or detect_isolation()
        if isolation.bwrap is None and not (admin and task.user_id == LOCAL_USER):
            return "error", (
                "This server cannot sandbox repository commands: bubblewrap is missing or does "
                f"not work here ({isolation.bwrap_missing}). Until it is installed "
                f"(`{INSTALL_HINT}`), only the local administrator of open mode may run tasks."
            )
        self._isolation = isolation
        try:
            return self._in_workspace(task, state, admin)
        except TestCommandUnusable as exc:
            return "failed", str(exc)

    def _in_workspace(self, task: Task, state: RunState, admin: bool) -> tuple[str, str | None]:
        keep = self.settings.keep_workspaces
        with Workspace(self.settings.workspace_root, keep=keep) as ws:
            repo = ws.repo_dir
            self._step("cloning", f"cloning {task.repo_url}")
            try:
                argv = parse_test_command(task.test_command)
                cloned = clone_repository(
                    task.repo_url,
                    repo,
                    task.ref,
                    timeout_s=self.settings.task_clone_timeout_seconds,
                    max_size_mb=self.settings.task_max_repo_mb,
                    allow_private_hosts=admin,
                    report_git_output=admin,
                    isolation=self._isolation,
                    cancel=self._abort,
                )
            except (InvalidRepoURL, InvalidGitRef, InvalidTestCommand, CloneError) as exc:
                self._checkpoint()  # a clone killed by a cancel or a stop is not a failure
                return "failed", f"Could not prepare the repository: {exc}"
            base = cloned.commit
            protected = existing_tests(list_files(repo))

            self._step("reproducing", "running the tests to reproduce the failure")
            before = self._run_tests(argv, repo)
            state.before = before
            self._save_outcome(tests_before=before)
            failing = before
            if before.ok:
                generated = self._generate_test(task, repo, argv, before)
                if generated is None:
                    return (
                        "failed",
                        "The failure could not be reproduced: the tests pass and no failing "
                        "regression test could be written",
                    )
                failing = generated
            self._git(repo, ws.home_dir, "add", "-A")
            self._git(
                repo, ws.home_dir, "commit", "--quiet", "--allow-empty", "-m", "asa: baseline"
            )
            baseline = self._git(repo, ws.home_dir, "rev-parse", "HEAD").strip()

            def fix_step(message: str) -> None:  # each localization/tool/answer step, recorded
                self._step("fixing", f"attempt {state.attempts}: {message}")
                self._ensure_budget(task)

            fixer = FixAgent(
                self.runtime, tracer=self._tracer, on_step=fix_step, **self._agent_args(task)
            )
            coder = CodeAgent(self.runtime, tracer=self._tracer, **self._agent_args(task))
            feedback: str | None = None
            previous_diff: str | None = None
            for attempt in range(1, task.max_attempts + 1):
                state.attempts = attempt
                self._step("fixing", fix_attempt_step(attempt), attempts=attempt)
                self._ensure_budget(task)
                try:
                    reply = fixer.propose_fix(
                        FixRequest(
                            repo,
                            task.bug_description,
                            task.test_command,
                            self._last_output or failing.summary,  # the `failing` run's output
                            feedback,
                            previous_diff,
                        )
                    )
                    self._step("applying", f"attempt {attempt}: CodeAgent applies the edits")
                    self._ensure_budget(task)
                    applied = coder.apply_reply(repo, reply, protected=protected)
                except AppError as exc:
                    if exc.code == "budget_exceeded":
                        raise TaskBudgetExhausted from exc
                    raise
                if applied.error is not None:
                    feedback = f"Your edits could not be applied:\n{applied.error}"
                    previous_diff = None
                    self._event("edit_rejected", applied.error)
                    continue
                # The agent's edits, taken before the tests run (which only see a copy anyway).
                diff = self._diff(repo, ws.home_dir, base)
                self._step("testing", f"attempt {attempt}: running the tests")
                after = self._run_tests(argv, repo)
                self._remember(state, Attempt(diff, after))
                if after.ok and _no_regression(before, after):
                    state.after = after
                    state.best = Attempt(diff, after)
                    return "succeeded", None
                feedback = "The tests still fail after your edits:\n```\n" + after.summary + "\n```"
                if after.ok:
                    feedback = (
                        "The tests pass, but fewer tests pass than before your change; "
                        "do not remove tests."
                    )
                failing = after
                previous_diff = diff
                self._git(repo, ws.home_dir, "reset", "--quiet", "--hard", baseline)
                self._git(repo, ws.home_dir, "clean", "--quiet", "-fdx")
            state.after = state.best.outcome if state.best else None
            return "failed", f"No fix passed the tests in {task.max_attempts} attempt(s)"

    def _generate_test(
        self, task: Task, repo: Path, argv: list[str], before: SuiteOutcome
    ) -> SuiteOutcome | None:
        self._step("generating_test", "the tests pass: TestGenerator writes a regression test")
        self._ensure_budget(task)
        generator = RegressionTestWriter(
            self.runtime, task_id=task.id, user_id=task.user_id, model=self._model_choice(task)
        )
        coder = CodeAgent(self.runtime, tracer=self._tracer, **self._agent_args(task))
        reply, _path = generator.write_test(
            repo, task.bug_description, task.test_command, before.summary
        )
        applied = coder.apply_reply(repo, reply, protected=existing_tests(list_files(repo)))
        if applied.error is not None:
            self._event("edit_rejected", applied.error)
            return None
        self._step("reproducing", "running the tests with the regression test")
        outcome = self._run_tests(argv, repo)
        return None if outcome.ok else outcome

    def _remember(self, state: RunState, attempt: Attempt) -> None:
        best = state.best
        if best is None or _failures(attempt.outcome) < _failures(best.outcome):
            state.best = attempt
        self._save_outcome(diff=state.best.diff if state.best else attempt.diff)

    # -- subprocesses -----------------------------------------------------------------------

    def _run_tests(self, argv: list[str], repo: Path) -> SuiteOutcome:
        """Run the test command on a private copy of ``repo``: what it writes is thrown away."""
        s = self.settings
        secrets = ["OPENAI_API_KEY", "DATABASE_URL", *s.secret_env_names]
        try:
            result = run_sandboxed(
                argv,
                repo,
                timeout_s=s.task_test_timeout_seconds,
                max_output_bytes=s.task_max_output_bytes,
                secret_names=secrets,
                cpu_seconds=s.task_cpu_seconds,
                memory_mb=s.task_memory_mb,
                network=s.task_network,
                isolation=self._isolation,
                policy=self._policy,
                scratch_copy=True,
                cancel=self._abort,
            )
        except OSError as exc:
            raise TestCommandUnusable(
                f"The test command could not be started: {argv[0]}: {exc.strerror or exc}"
            ) from exc
        self._check_not_aborted(result)
        self._last_output = result.output
        outcome = parse_outcome(result)
        self._event(
            "tests", f"exit {outcome.exit_code}, passed {outcome.passed}, failed {outcome.failed}"
        )
        return outcome

    def _git(self, repo: Path, home: Path, *args: str) -> str:
        result = run_sandboxed(
            ["git", *_GIT_HARDENING, *args],
            repo,
            timeout_s=60,
            max_output_bytes=8 * 1024 * 1024,
            home=home,
            extra_env={"GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"},
            isolation=self._isolation,
            policy=self._policy,
            cancel=self._abort,
        )
        self._check_not_aborted(result)
        if result.exit_code != 0 or result.timed_out:
            raise RuntimeError(f"git {args[0]} failed: {result.output[-500:]}")
        return result.output

    def _check_not_aborted(self, result: RunResult) -> None:
        """A command killed by a cancel or a stop ends the task as such, not as a failure."""
        if result.cancelled:
            self._checkpoint()

    def _diff(self, repo: Path, home: Path, base: str) -> str:
        self._git(repo, home, "add", "-A")
        return self._git(repo, home, "diff", "--cached", "--no-color", "--no-ext-diff", base)

    # -- persistence ------------------------------------------------------------------------

    def _event(self, kind: str, message: str) -> None:
        with self.runtime.session_factory() as session, session.begin():
            task_store.add_event(session, self.task_id, kind, message)

    def _save_outcome(self, **values: object) -> None:
        stored = {
            k: task_store.dump_outcome(v) if isinstance(v, SuiteOutcome) else v
            for k, v in values.items()
        }
        with self.runtime.session_factory() as session, session.begin():
            session.execute(update(Task).where(*self._owned()).values(**stored))

    def requeue(self) -> bool:
        """Put the task back in the queue if it is still this worker's and running: what a
        stop does (from any thread). False if it was not (any more)."""
        with self.runtime.session_factory() as session, session.begin():
            done = _execute(
                session,
                update(Task)
                .where(*self._owned(), Task.status == "running")
                .values(
                    status="queued", step="requeued at shutdown", worker_id=None, runs=Task.runs - 1
                ),
            )
            if done.rowcount == 0:
                return False
            task_store.add_event(
                session, self.task_id, "status", "requeued: the worker is shutting down"
            )
        return True

    def _requeue(self) -> None:
        self.requeue()

    def _finish(
        self, task: Task, state: RunState, status: str, reason: str | None, duration: float
    ) -> None:
        cost_pico, calls = 0, 0
        with self.runtime.session_factory() as session:
            cost_pico, calls = task_store.task_spend(session, [task.id]).get(task.id, (0, 0))
        best = state.best
        finished_at = task_store.now()
        with self.runtime.session_factory() as session, session.begin():
            done = _execute(
                session,
                update(Task)
                .where(*self._owned())
                .values(
                    status=status,
                    step=status,
                    attempts=state.attempts,
                    diff=best.diff if best else None,
                    tests_after=task_store.dump_outcome(state.after),
                    failure_reason=reason,
                    finished_at=finished_at,
                ),
            )
            if done.rowcount == 0:
                return  # given up on by this worker (requeued at shutdown): not ours to finish
            if status in OUTCOME_STATUSES:  # the recommendations' snapshot, with the status
                record_task_outcome(session.connection(), task.id)
            task_store.add_event(
                session, task.id, "status", status if not reason else f"{status}: {reason}"
            )
            # Notifications (issue 16): task.succeeded / task.failed, committed with the status.
            notify = task_finished_event(
                task_id=task.id,
                user_id=task.user_id,
                status=status,
                reason=reason,
                repo_url=task.repo_url,
                attempts=state.attempts,
                cost_pico=cost_pico,
            )
            if notify is not None:
                record_event(session, notify)
            task_store.write_task_metrics(
                session,
                task.id,
                {
                    "duration_seconds": round(duration, 3),
                    "attempts": state.attempts,
                    "llm_calls": calls,
                    "cost_usd": pico_to_usd(cost_pico),
                    "succeeded": int(status == "succeeded"),
                    f"status.{status}": 1,
                    "tests_passed_before": state.before.passed if state.before else None,
                    "tests_failed_before": state.before.failed if state.before else None,
                    "tests_passed_after": state.after.passed if state.after else None,
                    "tests_failed_after": state.after.failed if state.after else None,
                },
                finished_at,
            )
        TASK_DURATION.labels(status).observe(duration)
        TASK_SUCCESS.labels(status).inc()


def _execute(session: Session, statement: Update) -> CursorResult[Any]:
    """Run an UPDATE; its result says how many rows it changed."""
    return cast("CursorResult[Any]", session.execute(statement))


def _failures(outcome: SuiteOutcome | None) -> float:
    if outcome is None:
        return float("inf")
    if outcome.ok:
        return -1
    return float(outcome.failed) if outcome.failed is not None else 1e9


def _no_regression(before: SuiteOutcome, after: SuiteOutcome) -> bool:
    """Tests that passed before still pass: with counts known, no fewer pass now."""
    if before.passed is None or after.passed is None:
        return True
    return after.passed >= before.passed
