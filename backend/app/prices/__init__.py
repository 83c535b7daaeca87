"""Prices after the fact: the price sources rows were priced from, and repricing past rows.

Owns the recompute (``asa prices recompute`` and ``POST /api/v1/admin/prices/recompute``): it
reprices ``llm_usage`` rows from their stored token counts with the current price book and moves
the rows, every usage rollup, the budget counters and the task metrics together, one
transaction per batch; and its audit records (``price_recompute``). May import ``app.core``,
``app.models``, ``app.tracking`` (the price book, the usage writer's rollup door), the budget
counter SQL of ``app.budgets.store`` and the task metric names of ``app.tasks.metrics_writer``;
never ``app.api``.
"""
