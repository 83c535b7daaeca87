"""Agents: FixAgent, CodeAgent and the regression-test writer, with what they share.

Owns the prompts, the repository context shown to a model and the edit formats (parsing,
matching and applying a model's edits). May import ``app.tracking`` (every call goes through
``LLMClient``) and ``app.core``; never ``app.api``, ``app.tasks`` or the database.
"""
