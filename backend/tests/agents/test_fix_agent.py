"""FixAgent against the simulator through the real openai SDK over HTTP: the tool-using path
(search, read, then edits), the Localizer path for models without tools, and their usage rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.agents.fix_agent import MAX_TOOL_ROUNDS, FixAgent, FixRequest
from app.core.runtime import Runtime
from app.models import LLMUsage
from app.simulator.config import ScriptRule
from app.simulator.server import SimulatorServer
from tests.support.repos import failing_pytest_output, make_repo

CLAMP = "def clamp(x, lo, hi):\n    return max(lo, min(x, lo))\n"
FIX = """clamp.py
<<<<<<< SEARCH
    return max(lo, min(x, lo))
=======
    return max(lo, min(x, hi))
>>>>>>> REPLACE
"""
PRICING = """\
def unit_price(item):
    return item["cost"] / item["qty"]


def discount(total, coupon):
    if coupon == "HALF":
        return total * 2
    return total
"""


def usage_rows(runtime: Runtime, task_id: str) -> list[LLMUsage]:
    with Session(runtime.engine) as session:
        query = select(LLMUsage).where(LLMUsage.task_id == task_id)
        return list(session.scalars(query.order_by(LLMUsage.timestamp)))


def sent_messages(span_exporter: InMemorySpanExporter) -> list[str]:
    """The messages each LLM call sent, as the tracking spans captured them (JSON text)."""
    spans = [s for s in span_exporter.get_finished_spans() if s.name.startswith("chat ")]
    spans.sort(key=lambda s: s.start_time or 0)
    return [str((s.attributes or {}).get("gen_ai.input.messages", "")) for s in spans]


def fix_agent(
    runtime: Runtime,
    task_id: str,
    tracer: Tracer,
    *,
    use_tools: bool | None = None,
    on_step: Callable[[str], None] | None = None,
) -> FixAgent:
    return FixAgent(
        runtime,
        task_id=task_id,
        user_id="u1",
        model="gpt-4o-mini",
        tracer=tracer,
        use_tools=use_tools,
        on_step=on_step,
    )


def test_tool_rounds_search_then_read_then_answer_each_as_one_tracked_call(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    tmp_path: Path,
    tracer: Tracer,
    span_exporter: InMemorySpanExporter,
) -> None:
    runtime = runtime_factory(otel_instrumentation_genai_capture_message_content=True)
    repo = make_repo(
        tmp_path,
        {
            "clamp.py": CLAMP,
            "test_clamp.py": "from clamp import clamp\n\ndef test_clamp():\n"
            "    assert clamp(5, 0, 10) == 5\n",
        },
    )
    search = {"name": "search_code", "arguments": {"query": "def clamp"}}
    read = {"name": "read_file", "arguments": {"path": "clamp.py", "start": 1, "end": 2}}
    sim.state.add_scripts(
        [
            ScriptRule.model_validate(
                {
                    "match_system": "You are FixAgent",
                    "replies": [{"tool_calls": [search]}, {"tool_calls": [read]}, FIX],
                }
            )
        ]
    )
    steps: list[str] = []
    agent = fix_agent(runtime, "t-tools", tracer, on_step=steps.append)

    proposal = agent.propose(
        FixRequest(repo, "clamp ignores hi", "pytest", failing_pytest_output(repo))
    )

    assert proposal.path == "tools"
    assert proposal.reply == FIX
    rows = usage_rows(runtime, "t-tools")
    assert [(r.agent, r.status) for r in rows] == [("FixAgent", "success")] * 3
    assert rows[0].prompt_tokens < rows[1].prompt_tokens < rows[2].prompt_tokens
    sent = sent_messages(span_exporter)
    assert len(sent) == 3
    assert "clamp.py:1: def clamp(x, lo, hi):" in sent[1]  # the search's answer went back
    assert "    2|     return max(lo, min(x, lo))" in sent[2]  # and the read's
    assert steps[0].startswith("localized (tools): clamp")
    assert steps[1].startswith("FixAgent round 1 (tools): search_code(")
    assert steps[2].startswith("FixAgent round 2 (tools): read_file(")
    assert steps[3].startswith("FixAgent round 3 (tools): answered")
    assert all("prompt +" in step and "completion tokens, $" in step for step in steps[1:])


def test_tool_rounds_are_bounded_and_the_last_one_must_answer(
    runtime: Runtime, sim: SimulatorServer, tmp_path: Path, tracer: Tracer
) -> None:
    repo = make_repo(tmp_path, {"clamp.py": CLAMP})
    listing = {"tool_calls": [{"name": "list_dir", "arguments": {"path": "."}}]}
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "replies": [listing]})]
    )

    proposal = fix_agent(runtime, "t-bounded", tracer).propose(
        FixRequest(repo, "clamp ignores hi", "pytest", "1 failed")
    )

    assert len(usage_rows(runtime, "t-bounded")) == MAX_TOOL_ROUNDS + 1
    assert proposal.steps[-1].startswith(f"FixAgent round {MAX_TOOL_ROUNDS + 1} (tools): answered")


def test_without_tool_calls_a_localizer_call_picks_the_function_the_prompt_then_shows(
    runtime_factory: Callable[..., Runtime],
    sim: SimulatorServer,
    tmp_path: Path,
    tracer: Tracer,
    span_exporter: InMemorySpanExporter,
) -> None:
    runtime = runtime_factory(otel_instrumentation_genai_capture_message_content=True)
    repo = make_repo(
        tmp_path,
        {"pricing.py": PRICING, "check.sh": "#!/bin/sh\n./bin/check-prices\n"},
    )
    # A test command that is not pytest: no frames, no test names; the report names nothing.
    output = "checking prices...\nFAIL: the total with coupon HALF is 200, expected 50\n"
    sim.state.add_scripts(
        [
            ScriptRule.model_validate(
                {"match_system": "You are Localizer", "reply": "```\npricing.py::discount\n```"}
            ),
            ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": "no edits"}),
        ]
    )
    steps: list[str] = []
    agent = fix_agent(runtime, "t-localizer", tracer, use_tools=False, on_step=steps.append)

    proposal = agent.propose(
        FixRequest(repo, "Half-price coupons double the bill.", "sh check.sh", output)
    )

    assert proposal.path == "localizer"
    assert [r.agent for r in usage_rows(runtime, "t-localizer")] == ["Localizer", "FixAgent"]
    localizer_sent, fix_sent = sent_messages(span_exporter)
    assert "def discount(total, coupon)" in localizer_sent  # the map it picked from
    assert "    7|         return total * 2" in fix_sent
    assert steps[0].startswith("Localizer picked discount: ")


def test_a_provider_that_refuses_tools_gets_a_plain_request(
    runtime: Runtime, sim: SimulatorServer, tmp_path: Path, tracer: Tracer
) -> None:
    repo = make_repo(tmp_path, {"clamp.py": CLAMP})
    sim.state.add_scripts(
        [ScriptRule.model_validate({"match_system": "You are FixAgent", "reply": FIX})]
    )
    sim.state.schedule_fault("400")

    proposal = fix_agent(runtime, "t-refused", tracer).propose(
        FixRequest(repo, "`clamp()` ignores hi", "pytest", "1 failed")
    )

    assert proposal.reply == FIX and proposal.path == "direct"
    rows = usage_rows(runtime, "t-refused")
    assert [(r.agent, r.status != "success") for r in rows] == [
        ("FixAgent", True),
        ("FixAgent", False),
    ]
    assert any("refused tool calls" in step for step in proposal.steps)
