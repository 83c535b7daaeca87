"""What the agents share: a tracked LLM client and the edit format they speak."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from openai.types.chat import ChatCompletion
from opentelemetry import trace
from opentelemetry.trace import Tracer

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


class Agent:
    """An agent makes its LLM calls through ``LLMClient`` under its own name, in its own span."""

    name = "Agent"
    max_tokens = 4096

    def __init__(
        self,
        runtime: Runtime,
        *,
        task_id: str,
        user_id: str,
        model: str,
        tracer: Tracer | None = None,
    ) -> None:
        self.runtime = runtime
        self.task_id = task_id
        self.user_id = user_id
        self.model = model
        self._tracer = tracer or trace.get_tracer("app.agents")
        self.llm = LLMClient(
            task_id=task_id, user_id=user_id, agent=self.name, runtime=runtime, tracer=self._tracer
        )

    def ask(self, system: str, user: str) -> str:
        """One tracked chat completion; the reply's text."""
        response = self.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": user}]
        )
        return response.choices[0].message.content or "" if response.choices else ""

    def chat(self, messages: Sequence[Any], **kwargs: Any) -> ChatCompletion:
        """One tracked chat completion in the agent's span (extra ``kwargs`` such as ``tools``
        go to the SDK as they are)."""
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
