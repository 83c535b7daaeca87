"""Usage reports: what a task, a user or everyone spent, read from the ledger and its rollups.

Owns the report queries, the export, the task-metrics report, row retention, the insights
(forecasts, anomalies, recommendations) and the finished tasks' outcome rollups they read
(``outcomes``: the task package snapshots a task there when it finishes). May import
``app.core``, ``app.models``, ``app.schemas``, ``app.access`` (who may read what) and the task
metrics' definitions in ``app.tasks``; never ``app.api``.
"""
