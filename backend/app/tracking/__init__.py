"""Tracking: every LLM call's tokens, exact price, latency and status, written once to the ledger.

Owns ``LLMClient`` (the one wrapper every call goes through: chat completions, the Responses
API, embeddings), the per-call tracker (span, metrics, usage record) with the OpenTelemetry GenAI
names it uses (``semconv``), which provider serves a call (``providers``), pricing, the usage
writer with its spool, and the writer process (``write_process``) and tracking thread
(``db_worker``) that commit async callers' rows. May import ``app.core``,
``app.models``, ``app.observability``, the runtime that carries its resources, and
``app.usage.queries`` (the seed's ``get_task_usage`` and ``check_usage_limits`` on the client
read spend through it); never ``app.api`` or the task and agent packages.
"""
