"""Tasks: the queue, the worker that runs them, the orchestrator and their stored views.

A task goes route → ``store`` (queued) → ``worker`` → ``orchestrator`` → ``app.agents`` and
``app.sandbox``. May import ``app.core``, ``app.models``, ``app.schemas``, ``app.access``,
``app.budgets``' store, ``app.agents``, ``app.sandbox`` and ``app.usage.outcomes`` (a finished
task's outcome snapshot, taken in the transaction that finishes it); never ``app.api``.
"""
