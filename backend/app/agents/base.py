"""What the agents share: a tracked LLM client and the edit format they speak."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from openai.types.chat import ChatCompletion
from opentelemetry import trace
from opentelemetry.trace import Tracer

from app.core.errors import BudgetExceededError
from app.core.runtime import Runtime
from app.tracking.llm_client import LLMClient
from app.tracking.pricing import TokenUsage

logger = logging.getLogger(__name__)

EDIT_FORMAT = """Reply with edits in SEARCH/REPLACE blocks, one per change:

path/to/file.py
<<<<<<< SEARCH
the exact existing lines to change (copy them, with their indentation)
=======
the new lines
>>>>>>> REPLACE

To create a file, leave the SEARCH part empty. A unified diff in a ```diff block is accepted too.
Keep each SEARCH part small but unique in its file."""


class ModelChoice:
    """The model a task's agents call, shared by all of them: the task's model until a call's
    worst case no longer fits in the task's budget, then (when the task asked for one, and for
    the rest of the task) its cheaper ``fallback``. ``on_switch(from, to, reason)`` records it.
    """

    def __init__(
        self,
        model: str,
        fallback: str | None = None,
        on_switch: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.model = model
        self.fallback = fallback if fallback != model else None
        self.on_switch = on_switch
        self.switched = False
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return self.fallback if self.switched and self.fallback else self.model

    def switch_for(self, refused: BudgetExceededError) -> bool:
        """Switch to the fallback after the task's budget refused a call; False when there is
        nothing to switch to (no fallback, switched already, or another scope refused it)."""
        if refused.scope != "task" or self.fallback is None:
            return False
        with self._lock:
            if self.switched:
                return False
            self.switched = True
        if self.on_switch is not None:
            reason = (
                f"the next call's worst case (${refused.requested_usd}) exceeds what the task's "
                f"budget has left (${refused.limit_usd} limit, ${refused.spent_usd} spent)"
            )
            self.on_switch(self.model, self.fallback, reason)
        return True


class Agent:
    """An agent makes its LLM calls through ``LLMClient`` under its own name, in its own span.

    ``model``: a model name, or a task's shared ``ModelChoice`` (budget-aware fallback)."""

    name = "Agent"
    max_tokens = 4096

    def __init__(
        self,
        runtime: Runtime,
        *,
        task_id: str,
        user_id: str,
        model: str | ModelChoice,
        tracer: Tracer | None = None,
    ) -> None:
        self.runtime = runtime
        self.task_id = task_id
        self.user_id = user_id
        self.choice = model if isinstance(model, ModelChoice) else ModelChoice(model)
        self._tracer = tracer or trace.get_tracer("app.agents")
        self.llm = LLMClient(
            task_id=task_id, user_id=user_id, agent=self.name, runtime=runtime, tracer=self._tracer
        )

    @property
    def model(self) -> str:
        """The model the next call goes to."""
        return self.choice.current

    def ask(self, system: str, user: str) -> str:
        """One tracked chat completion; the reply's text."""
        response = self.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": user}]
        )
        return response.choices[0].message.content or "" if response.choices else ""

    def chat(self, messages: Sequence[Any], **kwargs: Any) -> ChatCompletion:
        """One tracked chat completion in the agent's span (extra ``kwargs`` such as ``tools``
        go to the SDK as they are)."""
        try:
            return self._chat(messages, **kwargs)
        except BudgetExceededError as refused:
            # Refused before reaching the provider: with a fallback, the same call again on it.
            if not self.choice.switch_for(refused):
                raise
        return self._chat(messages, **kwargs)

    def _chat(self, messages: Sequence[Any], **kwargs: Any) -> ChatCompletion:
        with self._tracer.start_as_current_span(self.name) as span:
            span.set_attribute("asa.agent", self.name)
            response: Any = self.llm.chat_completion(
                messages=list(messages),
                model=self.model,
                temperature=0,
                max_tokens=self.max_tokens,
                **kwargs,
            )
        assert isinstance(response, ChatCompletion)
        return response

    def describe_cost(self, response: ChatCompletion) -> str:
        """``"1,234 prompt + 56 completion tokens, $0.000123"`` for a step's event."""
        usage = response.usage
        if usage is None:
            return "usage not reported"
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        tokens = TokenUsage(usage.prompt_tokens, usage.completion_tokens, cached or 0)
        try:
            quote = self.runtime.price_book.quote(self.model, tokens)
            cost = f"${quote.cost_usd:.6f}" if quote.status != "unpriced" else "unpriced"
        except Exception:  # a report must not fail the step (the usage row has the cost)
            logger.warning("Could not price a %s step for its event", self.name, exc_info=True)
            cost = "cost in the usage rows"
        return (
            f"{usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion tokens, "
            f"{cost}"
        )
