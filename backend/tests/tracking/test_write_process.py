"""The writer process (``app.tracking.write_process``) commits async callers' rows and their
budget settlements outside the service's GIL: every row exactly once, the counters equal to the
ledger, whether the child lives, is killed mid-stream, or the service closes - on SQLite and
PostgreSQL, with the real child process, the openai SDK and the simulator."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, get_args

import openai
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, func, select, text

from app.api.v1.health import _WRITER_STATES, WriterState
from app.budgets.guard import Reservation, settle_data
from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.models import BudgetScope, LLMUsage
from app.simulator.server import SimulatorServer
from app.tracking.llm_client import AsyncLLMClient
from app.tracking.record import UsageRecord
from app.tracking.spool import Spooled
from app.tracking.write_process import ProcessState, WriterProcess, shareable
from tests.budgets.test_budgets import (
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    PRICES,
    call_cost_pico,
    script_exact_usage,
    set_limit,
)
from tests.budgets.test_outage import books
from tests.conftest import RuntimeFactory
from tests.support.reliability import wait_until

USER = "writer-user"


def limited_runtime(runtime_factory: RuntimeFactory, *, start: bool = True) -> Runtime:
    """A runtime whose every call reserves and settles (a limit it never reaches), its writer
    process started (``start``)."""
    runtime = runtime_factory(price_overrides=PRICES, budget_user_daily_usd=Decimal(1000))
    if start:
        assert writer_of(runtime).start(wait=60), "the writer process did not start"
    return runtime


def limited_child(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> tuple[Runtime, WriterProcess, int]:
    """A limited runtime, its writer process started, every call billed its worst case: the
    runtime, its writer process and the child's pid."""
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim)
    pid = process.pid
    assert pid is not None
    return runtime, process, pid


def writer_of(runtime: Runtime) -> WriterProcess:
    process = runtime.db_worker.process
    assert process is not None, "TRACKING_WRITER=process is the default"
    return process


async def call_many(
    runtime: Runtime,
    calls: int,
    concurrency: int,
    prefix: str,
    sdk: openai.AsyncOpenAI | None = None,
) -> int:
    """``calls`` limited calls from ``concurrency`` coroutines (through ``sdk``, default the
    runtime's); how many returned."""
    done = 0

    async def worker(i: int) -> None:
        nonlocal done
        client = AsyncLLMClient(
            task_id=f"{prefix}-{i % 5}", user_id=USER, runtime=runtime, openai_client=sdk
        )
        for _ in range(calls // concurrency):
            await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done


def rows(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(LLMUsage)) or 0)


async def test_the_writer_process_commits_every_row_and_settlement(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim)

    returned = await call_many(runtime, 200, 50, "wp")

    assert returned == 200 == rows(runtime)
    assert process.acknowledged == 200  # the child wrote them, not the thread
    assert process.handed_back == 0 and process.starts == 1
    assert books(runtime.engine).balanced, books(runtime.engine)  # spent = ledger, none held


async def test_a_writer_process_killed_mid_stream_loses_and_doubles_nothing(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim, latency_ms=5)
    first = process.pid
    assert first is not None

    async def kill_when_busy() -> None:
        while process.acknowledged < 60:
            await asyncio.sleep(0.005)
        os.kill(first, signal.SIGKILL)

    killer = asyncio.create_task(kill_when_busy())
    returned = await call_many(runtime, 300, 60, "kill")
    await killer
    # A later write starts a new child (after its 1 s back-off); the thread wrote meanwhile.
    deadline = time.monotonic() + 30
    while process.state != "up" or process.pid == first:
        assert time.monotonic() < deadline, process.state
        returned += await call_many(runtime, 10, 10, "after")
        await asyncio.sleep(0.1)
    acknowledged = process.acknowledged
    returned += await call_many(runtime, 40, 20, "after")

    assert process.starts == 2 and process.acknowledged == acknowledged + 40
    assert rows(runtime) == returned  # each call its one row: none lost, none twice
    assert books(runtime.engine).balanced, books(runtime.engine)


async def test_rows_a_stopped_child_never_acknowledged_are_written_by_the_thread(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim, latency_ms=1500)
    pid = process.pid
    assert pid is not None
    calls = asyncio.ensure_future(call_many(runtime, 20, 20, "stopped"))
    try:
        # The child took the reservations (the calls reached the provider): stopped now, it
        # takes the rows into its socket and commits none of them.
        assert await asyncio.to_thread(wait_until, lambda: sim.state.stats()["requests"] >= 20, 30)
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(2.0)
        assert not calls.done()  # each call waits for its row's commit
    finally:
        os.kill(pid, signal.SIGKILL)
    assert await calls == 20

    assert process.handed_back == 20 and process.acknowledged == 0
    assert rows(runtime) == 20
    assert books(runtime.engine).balanced, books(runtime.engine)


async def test_closing_the_runtime_lets_the_writer_process_finish(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim)
    child = process.pid
    assert await call_many(runtime, 40, 20, "close") == 40

    await asyncio.to_thread(runtime.close)

    assert process.state == "closed"
    assert child is not None and not os.path.exists(f"/proc/{child}")  # it exited, reaped
    assert process.handed_back == 0
    assert rows(runtime) == 40
    assert books(runtime.engine).balanced


async def test_closing_the_runtime_on_its_event_loop_drains_the_writer_process(
    runtime_factory: RuntimeFactory, sim: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """As the API's lifespan closes it: on the loop that was reading the acknowledgements."""
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim)
    assert await call_many(runtime, 40, 20, "close-on-loop") == 40
    assert process.loop_reads > 0

    runtime.close()  # blocks this loop: the receiver thread must read the last acks

    assert process.state == "closed"
    assert "did not stop in time" not in caplog.text  # it drained, it was not killed
    assert process.handed_back == 0
    assert rows(runtime) == 40
    assert books(runtime.engine).balanced


def test_acknowledgements_are_read_on_the_event_loop_and_by_the_thread_once_it_ends(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime = limited_runtime(runtime_factory)
    process = writer_of(runtime)
    script_exact_usage(sim)

    assert asyncio.run(call_many(runtime, 20, 10, "first-loop")) == 20
    on_first_loop = process.loop_reads
    assert on_first_loop > 0  # the calling loop read its own acknowledgements

    # That loop is gone: a thread's row is still acknowledged (the receiver thread reads again).
    written = runtime.db_worker.write(record_of("first-loop-0", 0), None)
    assert written.result(timeout=30).persisted
    assert process.acknowledged == 21

    # The next loop reads them in its turn (with an SDK client of its own: the runtime's
    # keeps connections of the first loop).
    async def on_a_second_loop() -> int:
        async with openai.AsyncOpenAI(api_key="sk-test", base_url=sim.base_url) as sdk:
            return await call_many(runtime, 20, 10, "second-loop", sdk)

    assert asyncio.run(on_a_second_loop()) == 20
    assert process.loop_reads > on_first_loop
    assert process.acknowledged == 41 and process.handed_back == 0
    assert rows(runtime) == 41
    assert books(runtime.engine).balanced, books(runtime.engine)


async def test_a_soft_limit_crossed_in_the_writer_process_is_counted_by_the_service(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    script_exact_usage(sim)
    runtime = limited_runtime(runtime_factory)
    probe = AsyncLLMClient(task_id="soft-probe", user_id="soft-probe", runtime=runtime)
    await probe.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    with runtime.engine.connect() as conn:
        cost = int(conn.scalar(select(func.max(LLMUsage.cost_pico_usd))) or 0)
    assert cost > 0
    from tests.budgets.test_budgets import set_limit

    set_limit(runtime, BudgetScope.TASK, "soft-task", Decimal(10 * cost) / 10**12)
    before = REGISTRY.get_sample_value("llm_budget_soft_limit_total", {"scope": "task"}) or 0.0
    client = AsyncLLMClient(task_id="soft-task", user_id=USER, runtime=runtime)
    for _ in range(9):  # the 8th call crosses 80%
        await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)

    assert writer_of(runtime).acknowledged == 10
    after = REGISTRY.get_sample_value("llm_budget_soft_limit_total", {"scope": "task"})
    assert after == before + 1


def test_in_memory_sqlite_cannot_be_shared_so_the_thread_writes() -> None:
    assert not shareable(create_engine("sqlite://"))
    assert not shareable(create_engine("sqlite:///:memory:"))
    assert shareable(create_engine("sqlite:////tmp/ledger.db"))
    assert shareable(create_engine("postgresql+psycopg://u@127.0.0.1/db"))


def test_the_thread_writer_is_kept_on_request(runtime_factory: RuntimeFactory) -> None:
    assert runtime_factory(tracking_writer="thread").db_worker.process is None


@pytest.mark.parametrize(
    "timestamp",
    [
        datetime(2026, 12, 1, 2, 50, 41, 782941, tzinfo=UTC),
        datetime(2026, 12, 1, 7, 50, 41, 782941, tzinfo=timezone(timedelta(hours=5))),
        datetime(1960, 5, 5, 1, 2, 3, 4, tzinfo=UTC),
        datetime(2026, 12, 1, 2, 50, 41),  # naive: sent as it is
    ],
)
def test_a_record_crosses_to_the_writer_process_unchanged(timestamp: datetime) -> None:
    record = record_of("wire", 12_345)
    record.timestamp = timestamp

    back = UsageRecord.from_wire(pickle.loads(pickle.dumps(record.to_wire())))

    assert back == record  # the same instant, to the microsecond
    assert back.timestamp.utcoffset() == (timedelta(0) if timestamp.tzinfo else None)


# -- a repeated row settles nothing twice --------------------------------------------------


def record_of(task_id: str, cost: int) -> UsageRecord:
    return UsageRecord(
        request_id=uuid.uuid4().hex,
        model=MODEL,
        status="success",
        task_id=task_id,
        user_id=USER,
        cost_pico_usd=cost,
    )


def held_reservation(runtime: Runtime, task_id: str) -> Reservation:
    guard = runtime.budget_guard
    assert guard is not None
    from app.tracking.tracker import CallContext

    reservation = guard.reserve(
        context=CallContext(task_id=task_id, user_id=USER),
        model=MODEL,
        request={"messages": MESSAGES, "model": MODEL, "max_tokens": MAX_TOKENS},
    )
    assert reservation is not None and reservation.held
    return reservation


def test_a_row_written_again_after_its_writer_died_settles_only_if_new(
    runtime_factory: RuntimeFactory,
) -> None:
    runtime = limited_runtime(runtime_factory, start=False)
    reservation = held_reservation(runtime, "again")
    record = record_of("again", 1_000_000)
    settled: list[object] = []

    def settle(tx: object) -> None:
        settled.append(settle_data(tx, record, reservation.to_json()))  # type: ignore[arg-type]

    first = runtime.writer.write(record, also=settle, also_if_new=True)
    again = runtime.writer.write(record, also=settle, also_if_new=True)

    assert first.persisted and first.also_committed
    assert again.persisted and again.also_committed  # settled with the first write
    assert len(settled) == 1
    assert rows(runtime) == 1
    assert books(runtime.engine).balanced


def test_a_repeated_spool_line_settles_once_and_a_row_written_line_settles(
    runtime_factory: RuntimeFactory,
) -> None:
    runtime = limited_runtime(runtime_factory, start=False)
    settled: list[str] = []
    replay = runtime.writer.settlement_replayer
    assert replay is not None

    def counted(tx: Any, record: UsageRecord, settlement: Mapping[str, Any]) -> None:
        settled.append(record.request_id)
        replay(tx, record, settlement)

    runtime.writer.settlement_replayer = counted
    twice = held_reservation(runtime, "spool-twice")
    record = record_of("spool-twice", 2_000_000)
    # The same line twice (a file replayed again after a crash between commit and delete, or
    # a row a dying writer process spooled and the thread spooled again): a gateway key's spend
    # would be booked twice if the second settled too.
    runtime.writer.insert_spooled(
        [Spooled(record, twice.to_json()), Spooled(record, twice.to_json())]
    )
    assert settled == [record.request_id]
    assert books(runtime.engine).balanced

    # A row that committed without its settlement (the database went away in between).
    late = held_reservation(runtime, "spool-late")
    written = record_of("spool-late", 3_000_000)
    runtime.writer.write(written)
    assert not books(runtime.engine).balanced  # its reservation is still held
    runtime.writer.insert_spooled([Spooled(written, late.to_json(), row_written=True)])
    assert settled == [record.request_id, written.request_id]
    assert books(runtime.engine).balanced
    assert rows(runtime) == 2


# -- a reservation that loses a deadlock is taken again -------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_reservation_postgresql_ends_to_break_a_deadlock_is_taken_again(
    runtime_factory: RuntimeFactory,
) -> None:
    """With rows committed beside the reservations, a batch of several tasks' rows books spend
    on counters out of the reservations' lock order; PostgreSQL breaks such a deadlock by
    ending one transaction. A reservation it ended is taken again, not refused."""
    runtime = limited_runtime(runtime_factory, start=False)
    held_reservation(runtime, "race-task")  # its counters exist from now on
    guard = runtime.budget_guard
    assert guard is not None
    from app.tracking.tracker import CallContext

    other = runtime.engine.connect()
    lock = "SELECT 1 FROM budget_counter WHERE scope = :scope AND subject_id = :subject FOR UPDATE"
    with other.begin():
        # The user's counter first, as a row of another task booking its spend would...
        other.execute(text(lock), {"scope": "user_daily", "subject": USER})
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(
                guard.reserve(
                    context=CallContext(task_id="race-task", user_id=USER),
                    model=MODEL,
                    request={"messages": MESSAGES, "model": MODEL, "max_tokens": MAX_TOKENS},
                )
            )
        )
        thread.start()  # takes the task's counter, then waits for the user's
        time.sleep(0.3)
        # ... then the task's counter: a cycle, which PostgreSQL breaks by ending the
        # reservation's transaction (it has waited longest).
        other.execute(text(lock), {"scope": "task", "subject": "race-task"})
    other.close()
    thread.join(30)

    assert len(result) == 1 and isinstance(result[0], Reservation) and result[0].held


def test_health_names_every_state_of_the_writer_process() -> None:
    assert set(_WRITER_STATES) == set(get_args(ProcessState))
    assert set(_WRITER_STATES.values()) | {"thread"} == set(get_args(WriterState))


# -- reservations taken by the writer process --------------------------------------------------


def blocked_total(scope: str) -> float:
    return REGISTRY.get_sample_value("llm_budget_blocked_total", {"scope": scope}) or 0.0


async def test_the_writer_process_takes_the_loops_reservations_and_the_cap_holds(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    cost = call_cost_pico()
    runtime = runtime_factory(
        price_overrides=PRICES, budget_user_daily_usd=Decimal(12 * cost) / 10**12
    )
    process = writer_of(runtime)
    assert process.reserves and process.start(wait=60)
    script_exact_usage(sim, latency_ms=20)
    blocked_before = blocked_total("user_daily")

    async def one(i: int) -> str:
        client = AsyncLLMClient(task_id=f"capped-{i % 7}", user_id=USER, runtime=runtime)
        try:
            await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
        except BudgetExceededError as exc:
            return f"blocked: {exc.scope}"
        return "ok"

    outcomes = await asyncio.gather(*(one(i) for i in range(40)))

    assert sorted(set(outcomes)) == ["blocked: user_daily", "ok"]
    assert outcomes.count("ok") == 12 and sim.state.stats()["requests"] == 12
    assert process.answered == 40  # every call asked the writer process first
    # A refusal is decided again and recorded by the tracking thread: the metric, the row.
    assert blocked_total("user_daily") - blocked_before == 28
    with runtime.engine.connect() as conn:
        statuses = dict(
            conn.execute(select(LLMUsage.status, func.count()).group_by(LLMUsage.status)).all()
        )
    assert statuses == {"success": 12, "blocked": 28}
    final = books(runtime.engine)
    assert final.balanced and final.open_reservations == 0, final


def test_a_reservation_taken_and_never_answered_is_given_back(
    runtime_factory: RuntimeFactory,
) -> None:
    from app.tracking.tracker import CallContext

    runtime = limited_runtime(runtime_factory, start=False)
    guard = runtime.budget_guard
    assert guard is not None
    request = guard.request(
        context=CallContext(task_id="lost-task", user_id=USER),
        model=MODEL,
        request={"messages": MESSAGES, "model": MODEL, "max_tokens": MAX_TOKENS},
    )
    assert request is not None
    # What the writer process does with it, here: the reservation is committed...
    (taken,) = guard.reserve_requests([request])
    assert isinstance(taken, Reservation) and taken.held and taken.id == request.row_id
    assert books(runtime.engine).open_reservations == 1
    # ... and the answer never reaches the caller, which gives it back before reserving again.
    assert guard.release(request.row_id) is True
    assert guard.release(request.row_id) is False  # once
    final = books(runtime.engine)
    assert final.open_reservations == 0
    assert all(reserved == 0 for _, reserved in final.counters.values()), final


async def test_reservations_asked_of_a_child_that_dies_go_to_the_thread(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime, process, pid = limited_child(runtime_factory, sim)
    os.kill(pid, signal.SIGSTOP)  # it takes the requests into its socket and answers none
    try:
        calls = asyncio.ensure_future(call_many(runtime, 20, 20, "unanswered"))
        await asyncio.sleep(0.5)
        assert not calls.done() and sim.state.stats()["requests"] == 0  # all wait for answers
    finally:
        os.kill(pid, signal.SIGKILL)
    assert await calls == 20

    assert process.answered == 0
    assert rows(runtime) == 20
    final = books(runtime.engine)
    assert final.balanced and final.open_reservations == 0, final


async def test_a_caller_that_gives_up_while_the_child_reserves_leaves_nothing_reserved(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime, process, pid = limited_child(runtime_factory, sim)
    client = AsyncLLMClient(task_id="gave-up", user_id=USER, runtime=runtime)
    os.kill(pid, signal.SIGSTOP)  # the request waits in its socket
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS), 0.3
            )
    finally:
        os.kill(pid, signal.SIGCONT)
    # The child takes the reservation now, and answers a caller that is gone: given back.
    assert await asyncio.to_thread(wait_until, lambda: process.answered == 1, 10)
    assert await asyncio.to_thread(
        wait_until, lambda: books(runtime.engine).open_reservations == 0, 10
    ), books(runtime.engine)
    assert sim.state.stats()["requests"] == 0
    final = books(runtime.engine)  # nothing spent (no row), nothing held
    assert final.counters and set(final.counters.values()) == {(0, 0)}, final


async def test_an_override_set_in_the_service_binds_the_writer_processs_next_reservation(
    runtime_factory: RuntimeFactory, sim: SimulatorServer
) -> None:
    runtime, process, _ = limited_child(runtime_factory, sim)
    client = AsyncLLMClient(task_id="overridden", user_id=USER, runtime=runtime)
    await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    assert process.answered == 1  # the child read the user's limits (and keeps them)
    # An administrator lowers the user's limit below one call, through this process.
    set_limit(runtime, BudgetScope.USER_DAILY, USER, Decimal(call_cost_pico() // 2) / 10**12)
    with pytest.raises(BudgetExceededError) as refused:
        await client.chat_completion(messages=MESSAGES, model=MODEL, max_tokens=MAX_TOKENS)
    assert refused.value.scope == "user_daily"
    assert process.answered == 2 and sim.state.stats()["requests"] == 1
    assert books(runtime.engine).open_reservations == 0


def test_the_writer_process_holds_a_gateway_keys_budget_too(
    runtime_factory: RuntimeFactory,
) -> None:
    from app.budgets.guard import TASK_WINDOW
    from app.budgets.store import CounterKey, read_counter
    from app.core.prepared import Tx
    from app.gateway.proxy import GatewayCallContext

    runtime = limited_runtime(runtime_factory, start=False)
    guard = runtime.budget_guard
    assert guard is not None
    cost = call_cost_pico()
    set_limit(runtime, BudgetScope.KEY, "key-1", Decimal(cost * 3 // 2) / 10**12)
    request = {"messages": MESSAGES, "model": MODEL, "max_tokens": MAX_TOKENS}

    def ask() -> Any:
        context = GatewayCallContext(task_id="keyed", user_id=USER, key_id="key-1")
        asked = guard.request(context=context, model=MODEL, request=request)
        assert asked is not None and asked.key_id == "key-1"
        return guard.reserve_requests([asked])[0]  # as the writer process does

    first = ask()
    assert isinstance(first, Reservation) and first.held and first.key_id == "key-1"
    key = CounterKey(BudgetScope.KEY, "key-1", TASK_WINDOW)
    with runtime.engine.connect() as conn:
        state = read_counter(Tx.of(conn), key)
    assert state is not None and state.reserved_pico == cost  # the key's counter holds it
    assert ask() == "refused"  # a second call would pass the key's cap
