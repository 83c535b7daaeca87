"""What the three agents share: a tracked LLM client and the edit format they speak."""

from __future__ import annotations

from typing import Any

from openai.types.chat import ChatCompletion
from opentelemetry import trace
from opentelemetry.trace import Tracer

from app.core.runtime import Runtime
from app.tracking.llm_client import LLMClient

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
        self.model = model
        self._tracer = tracer or trace.get_tracer("app.agents")
        self.llm = LLMClient(
            task_id=task_id, user_id=user_id, agent=self.name, runtime=runtime, tracer=self._tracer
        )

    def ask(self, system: str, user: str) -> str:
        """One tracked chat completion; the reply's text."""
        with self._tracer.start_as_current_span(self.name) as span:
            span.set_attribute("asa.agent", self.name)
            response: Any = self.llm.chat_completion(
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                model=self.model,
                temperature=0,
                max_tokens=self.max_tokens,
            )
        assert isinstance(response, ChatCompletion)
        return response.choices[0].message.content or "" if response.choices else ""
