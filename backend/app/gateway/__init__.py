"""The OpenAI-compatible gateway: ``/v1/chat/completions``, ``/v1/responses``,
``/v1/embeddings`` and ``/v1/models`` in front of the configured upstreams.

Owns the routing table (``routing``), the OpenAI-shaped errors of ``/v1`` (``errors``), who a
gateway call is for (``callers``: keys, their model allow-list, task ownership, agent labels),
forwarding with fallbacks and the accounting of each call (``proxy``), and SSE pass-through
(``streaming``). Every call is tracked by the tracking core (``app.tracking.tracker``) and
budgeted by ``app.budgets``: one ``llm_usage`` row, one span, the same metrics as an in-process
call. May import ``app.core``, ``app.models``, ``app.tracking``, ``app.budgets``,
``app.access`` and ``app.api.auth`` (for the principal, as ``app.web`` does).
"""
