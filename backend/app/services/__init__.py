"""The seed's import path, kept for its users: ``from app.services.llm_client import LLMClient``.

The code lives in domain packages (``app.tracking``, ``app.budgets``, ``app.usage``,
``app.tasks``, ``app.agents``, ``app.sandbox``, ``app.access``); see ``docs/ARCHITECTURE.md``.
"""
