"""Events reach the outbox with the fact that caused them, once per fact."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from app.core.db import create_session_factory, transaction
from app.core.errors import BudgetExceededError
from app.core.prepared import write_gate
from app.core.runtime import Runtime
from app.models import NotificationEvent, Task, UsageRollupDailyOverall
from app.notifications import outbox
from app.notifications.events import EventKind, task_finished_event
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import LLMClient

MODEL = "notify-model"
PRICES = {MODEL: {"input_mtok": "1", "output_mtok": "2"}}
MESSAGES = [{"role": "user", "content": "a call that costs"}]
# Each call is billed 1,000 prompt and 500 completion tokens: $0.002.
CALL_USD = Decimal("0.002")


def events(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(NotificationEvent).order_by(NotificationEvent.id)))


def bill_each_call(sim: SimulatorServer) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 0}
    rule = {"match_model": MODEL, "reply": {"content": "x", "usage": usage}}
    sim.state.add_scripts([ScriptRule.model_validate(rule)])


def _task(session: Any, task_id: str) -> None:
    session.execute(
        insert(Task).values(
            id=task_id,
            user_id="alice",
            repo_url="https://example.org/r.git",
            bug_description="b",
            test_command="pytest",
            model=MODEL,
            status="running",
            step="testing",
            created_at=datetime.now(UTC),
        )
    )


def test_an_event_commits_with_its_fact_and_not_without_it(engine: Engine) -> None:
    factory = create_session_factory(engine)
    with transaction(factory) as session:
        _task(session, "tsk_a")
    finished = task_finished_event(
        task_id="tsk_a",
        user_id="alice",
        status="failed",
        reason="no fix",
        repo_url="https://example.org/r.git",
        attempts=3,
        cost_pico=1_500_000_000,
    )
    assert finished is not None

    def fail_after_recording() -> None:
        with transaction(factory) as session:
            session.execute(update(Task).where(Task.id == "tsk_a").values(status="failed"))
            assert outbox.record_event(session, finished)
            raise RuntimeError("the fact's transaction fails")

    with pytest.raises(RuntimeError):
        fail_after_recording()
    assert events(engine) == []

    with transaction(factory) as session:
        session.execute(update(Task).where(Task.id == "tsk_a").values(status="failed"))
        outbox.record_event(session, finished)
    (row,) = events(engine)
    assert (row.id, row.kind, row.subject_user_id, row.state) == (
        "task.finished:tsk_a",
        "task.failed",
        "alice",
        "pending",
    )


def test_the_same_fact_recorded_twice_is_one_event(engine: Engine) -> None:
    event = task_finished_event(
        task_id="tsk_b",
        user_id="bob",
        status="succeeded",
        reason=None,
        repo_url="r",
        attempts=1,
        cost_pico=0,
    )
    assert event is not None
    with write_gate(engine).transaction() as tx:
        assert outbox.record_event(tx, event) is True
    with engine.begin() as conn:
        assert outbox.record_event(conn, event) is False
    assert [e.kind for e in events(engine)] == ["task.succeeded"]


def test_a_cancelled_task_tells_nobody() -> None:
    assert (
        task_finished_event(
            task_id="t",
            user_id="u",
            status="cancelled",
            reason=None,
            repo_url="r",
            attempts=0,
            cost_pico=0,
        )
        is None
    )


def test_soft_threshold_fires_once_per_window_in_the_settlement(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    # A $0.01 daily cap for carol: the 4th $0.002 call passes 80 %, the 5th reaches 100 %.
    runtime = runtime_factory(price_overrides=PRICES, budget_user_daily_usd=Decimal("0.01"))
    bill_each_call(sim)
    client = LLMClient(user_id="carol", runtime=runtime)
    for _ in range(3):
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=500)
    assert events(runtime.engine) == []

    for _ in range(2):
        client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=500)

    (soft,) = events(runtime.engine)
    today = datetime.now(UTC).date().isoformat()
    assert soft.id == f"budget.soft_threshold:user_daily:carol:{today}"
    assert soft.subject_user_id == "carol"
    payload = soft.payload
    assert '"limit_usd":"0.01"' in payload and '"spent_usd":"0.008"' in payload


def test_a_blocked_scope_fires_exhausted_once_per_window(
    runtime_factory: Callable[..., Runtime], sim: SimulatorServer
) -> None:
    runtime = runtime_factory(price_overrides=PRICES, budget_task_max_usd=Decimal("0.003"))
    bill_each_call(sim)
    client = LLMClient(task_id="t-ex", user_id="dave", runtime=runtime)
    client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=500)
    for _ in range(3):
        with pytest.raises(BudgetExceededError):
            client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=500)

    # Three refusals, one event ($0.002 of $0.003 is 67 %: no soft threshold either).
    kinds = {e.id: (e.kind, e.subject_user_id) for e in events(runtime.engine)}
    assert kinds == {"budget.exhausted:task:t-ex:lifetime": ("budget.exhausted", "dave")}


def test_models_without_a_price_are_told_once_a_month(engine: Engine) -> None:
    day = date(2026, 3, 14)
    with engine.begin() as conn:
        for model, unpriced in (("mystery", 3), ("priced", 0)):
            conn.execute(
                insert(UsageRollupDailyOverall).values(
                    day=day, model=model, agent="", requests=3, unpriced_calls=unpriced
                )
            )
    assert outbox.record_unpriced_models(engine, day) == 1
    assert outbox.record_unpriced_models(engine, day) == 0
    (event,) = events(engine)
    assert (event.id, event.kind) == ("model.unpriced:2026-03:mystery", EventKind.MODEL_UNPRICED)
