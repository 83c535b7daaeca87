"""FixAgent: localizes the fault, shows the model the code that matters and asks for a fix.

The first prompt comes from the deterministic localization (:mod:`app.agents.localize`) within
a token budget (:mod:`app.agents.prompt_context`). When that is not enough the agent looks
further: a model with tool calls may call ``search_code``, ``read_file`` and ``list_dir``
(:mod:`app.agents.tools`) for up to ``max_tool_rounds`` rounds before it answers with edits; for
a model without them, a Localizer call picks definitions from the repository map when the
deterministic pass found none on strong evidence. Every round is one tracked LLM call, and
each step is reported through ``on_step`` (the orchestrator records it as a task event).

After a failed attempt (``FixRequest.previous_diff``), the prompt opens with the feedback, the
code that attempt changed and the definitions the new failure goes through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai
from openai.types.chat import ChatCompletion
from opentelemetry.trace import Tracer

from app.agents.base import EDIT_FORMAT, Agent, ModelChoice
from app.agents.localize import Localization, localize
from app.agents.localizer import Localizer
from app.agents.prompt_context import (
    DEFAULT_BUDGET_TOKENS,
    LINE_NUMBER_NOTE,
    PromptContext,
    render_context,
)
from app.agents.symbols import ModuleCache, build_index
from app.agents.tokens import estimate_tokens
from app.agents.tools import TOOL_SPECS, RepoTools
from app.core.runtime import Runtime

MAX_TOOL_ROUNDS = 4
MAX_CALLS_PER_ROUND = 6
MAX_TOOL_OUTPUT_CHARS = 80_000  # over all rounds: what the tools may add to the conversation
FAILURE_EXCERPT_LINES = 60
FAILURE_EXCERPT_CHARS = 4000
PREVIOUS_DIFF_CHARS = 3000
BUG_REPORT_CHARS = 8000
SECTION_HEADINGS_TOKENS = 100  # the context's "## ..." headings, outside its own count
# Chat models without function calling; anything else is offered tools (and falls back to the
# Localizer path if the provider refuses them).
_NO_TOOLS = re.compile(r"(?:^|/)(?:o1-mini|o1-preview|davinci|babbage|text-)|instruct", re.I)

SYSTEM_PROMPT = f"""You are FixAgent, a careful software engineer. A test command fails because
of a bug. Find the fault and fix it in the source code with the smallest correct change.
Do not modify or delete existing tests: they define the expected behaviour.
{LINE_NUMBER_NOTE}

{EDIT_FORMAT}"""

TOOLS_NOTE = f"""If the code you need is not shown, call the tools first: search_code, read_file
(path, start, end) and list_dir, for at most {MAX_TOOL_ROUNDS} rounds. Then reply with the
edits (and no tool call)."""

FixPath = Literal["direct", "tools", "localizer"]
StepCallback = Callable[[str], None]


@dataclass(frozen=True)
class FixRequest:
    repo: Path
    bug_description: str
    test_command: str
    failure_output: str
    """The whole output of the failing run (its frames are localized), not only its tail."""
    feedback: str | None = None
    previous_diff: str | None = None
    """The diff of the previous, failed attempt (since reverted): its code is shown first."""


@dataclass
class FixProposal:
    reply: str
    path: FixPath
    steps: list[str] = field(default_factory=list)
    prompt_tokens: int = 0


def supports_tool_calls(model: str) -> bool:
    return _NO_TOOLS.search(model) is None


class FixAgent(Agent):
    name = "FixAgent"
    max_tool_rounds = MAX_TOOL_ROUNDS

    def __init__(
        self,
        runtime: Runtime,
        *,
        task_id: str,
        user_id: str,
        model: str | ModelChoice,
        tracer: Tracer | None = None,
        use_tools: bool | None = None,
        on_step: StepCallback | None = None,
        budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    ) -> None:
        super().__init__(runtime, task_id=task_id, user_id=user_id, model=model, tracer=tracer)
        self.use_tools = supports_tool_calls(self.model) if use_tools is None else use_tools
        self.on_step = on_step
        self.budget_tokens = budget_tokens
        self._modules: ModuleCache = {}  # kept across attempts: a retry parses what changed

    # -- the prompt --------------------------------------------------------------------------

    def localize(self, request: FixRequest) -> Localization:
        index = build_index(request.repo, cache=self._modules)
        return localize(
            request.repo,
            request.bug_description,
            request.failure_output,
            previous_diff=request.previous_diff,
            index=index,
        )

    def build_prompt(self, request: FixRequest, loc: Localization | None = None) -> str:
        return compose_prompt(request, loc or self.localize(request), self.budget_tokens)[0]

    # -- asking ------------------------------------------------------------------------------

    def propose_fix(self, request: FixRequest) -> str:
        return self.propose(request).reply

    def propose(self, request: FixRequest) -> FixProposal:
        """Localize, then ask for edits by the path this model supports."""
        loc = self.localize(request)
        steps: list[str] = []
        path: FixPath = "tools" if self.use_tools else "direct"
        if not self.use_tools and not loc.confident:
            self._localizer_pass(request, loc, steps)
            path = "localizer"
        prompt, context = compose_prompt(request, loc, self.budget_tokens)
        top = ", ".join(f.symbol.qualname for f in loc.findings[:3]) or "no definition"
        self._report(
            steps,
            f"localized ({path}): {top}; {len(loc.frames)} traceback lines, "
            f"{len(loc.tests)} failing tests; prompt ~{estimate_tokens(prompt):,} tokens "
            f"(budget {self.budget_tokens:,}), {len(context.left_out)} pieces left out",
        )
        if path == "tools":
            try:
                reply = self._tool_loop(request, prompt, steps)
            except _ToolsRefused:
                path = "direct"
                if not loc.confident:
                    self._localizer_pass(request, loc, steps)
                    path = "localizer"
                    prompt, context = compose_prompt(request, loc, self.budget_tokens)
                reply = self._answer(prompt, steps)
        else:
            reply = self._answer(prompt, steps)
        return FixProposal(reply, path, steps, estimate_tokens(prompt))

    def _answer(self, prompt: str, steps: list[str]) -> str:
        response = self.chat(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        )
        self._report(steps, f"FixAgent answered: {self.describe_cost(response)}")
        return _content(response)

    def _localizer_pass(self, request: FixRequest, loc: Localization, steps: list[str]) -> None:
        localizer = Localizer(
            self.runtime,
            task_id=self.task_id,
            user_id=self.user_id,
            model=self.choice,
            tracer=self._tracer,
        )
        symbols, paths, response = localizer.pick(
            loc, request.bug_description, failure_excerpt(request.failure_output)
        )
        loc.pin(symbols, "picked by the Localizer")
        for rel in paths:
            loc.seed_paths[rel] = loc.seed_paths.get(rel, 0.0) + 10.0
        picked = ", ".join([s.qualname for s in symbols] + paths) or "nothing usable"
        self._report(steps, f"Localizer picked {picked}: {localizer.describe_cost(response)}")

    def _tool_loop(self, request: FixRequest, prompt: str, steps: list[str]) -> str:
        tools = RepoTools(request.repo)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": f"{SYSTEM_PROMPT}\n\n{TOOLS_NOTE}"},
            {"role": "user", "content": prompt},
        ]
        budget = MAX_TOOL_OUTPUT_CHARS
        for round_number in range(1, self.max_tool_rounds + 2):
            final = round_number > self.max_tool_rounds
            try:
                response = self.chat(
                    messages, tools=TOOL_SPECS, tool_choice="none" if final else "auto"
                )
            except openai.BadRequestError as exc:
                if round_number == 1:
                    self._report(steps, "the provider refused tool calls; answering without")
                    raise _ToolsRefused from exc
                raise
            message = response.choices[0].message if response.choices else None
            requested = (message.tool_calls or []) if message is not None else []
            calls = [c for c in requested if hasattr(c, "function")]  # function tools only
            cost = self.describe_cost(response)
            if not calls or final:
                self._report(steps, f"FixAgent round {round_number} (tools): answered; {cost}")
                return _content(response)
            messages.append(
                {
                    "role": "assistant",
                    "content": message.content if message else None,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {
                                "name": c.function.name,
                                "arguments": c.function.arguments,
                            },
                        }
                        for c in calls
                    ],
                }
            )
            done: list[str] = []
            for position, call in enumerate(calls):
                if position >= MAX_CALLS_PER_ROUND or budget <= 0:
                    answer = "Error: no more tool calls this round; answer with what you have."
                else:
                    answer = tools.run(call.function.name, call.function.arguments)[:budget]
                    budget -= len(answer)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": answer})
                done.append(f"{call.function.name}({_short(call.function.arguments)})")
            self._report(steps, f"FixAgent round {round_number} (tools): {', '.join(done)}; {cost}")
        raise AssertionError("unreachable: the last round answers")  # pragma: no cover

    def _report(self, steps: list[str], message: str) -> None:
        steps.append(message)
        if self.on_step is not None:
            self.on_step(message)


def compose_prompt(
    request: FixRequest, loc: Localization, budget_tokens: int = DEFAULT_BUDGET_TOKENS
) -> tuple[str, PromptContext]:
    """FixAgent's user prompt for ``request`` within ``budget_tokens``, and what it holds.

    A first attempt opens with the bug report, the command and the failure; a retry opens with
    the feedback, the previous edit and the code it changed, then what the new failure points at.
    """
    head = {
        "bug": f"## Bug report\n{request.bug_description[:BUG_REPORT_CHARS]}",
        "command": f"## Test command\n`{request.test_command}`",
        "output": "## Failing test output (excerpt)\n```\n"
        + failure_excerpt(request.failure_output)
        + "\n```",
    }
    feedback: list[str] = []
    if request.feedback:
        feedback.append(f"## Your previous attempt did not work\n{request.feedback}")
    if request.previous_diff:
        diff = request.previous_diff[-PREVIOUS_DIFF_CHARS:]
        feedback.append(f"## Your previous edit (reverted)\n```diff\n{diff}\n```")
    closing = "Reply with the edits that fix the bug."
    fixed = estimate_tokens("\n\n".join([*head.values(), *feedback, closing]))
    context = render_context(loc, max(0, budget_tokens - fixed - SECTION_HEADINGS_TOKENS))
    if feedback:
        parts = [
            *feedback,
            *context.render(["touched", "definitions", "windows"]),
            head["bug"],
            head["command"],
            head["output"],
            *context.render(["tests", "callees", "neighbours", "map", "left_out"]),
        ]
    else:
        parts = [
            head["bug"],
            head["command"],
            head["output"],
            *context.render(
                ["definitions", "tests", "windows", "callees", "neighbours", "map", "left_out"]
            ),
        ]
    parts.append(closing)
    return "\n\n".join(parts), context


class _ToolsRefused(Exception):
    """The provider answered the first tools request with 400: this model has no tools."""


def failure_excerpt(output: str) -> str:
    """The end of a test run's output: where pytest and unittest put the failures' summary."""
    lines = output.rstrip().splitlines()[-FAILURE_EXCERPT_LINES:]
    text = "\n".join(lines)
    return text[-FAILURE_EXCERPT_CHARS:]


def _content(response: ChatCompletion) -> str:
    return response.choices[0].message.content or "" if response.choices else ""


def _short(arguments: str, limit: int = 80) -> str:
    text = " ".join(arguments.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
