"""Agents: FixAgent, CodeAgent, the regression-test writer and the Localizer, with what they share.

Owns the prompts, what a model is shown of a repository (localization: ``signals``, ``symbols``,
``lexical``, ``localize``; rendering within a token budget: ``prompt_context``, ``repo_map``),
the tools FixAgent may call (``tools``) and the edit formats (parsing, matching and applying a
model's edits). May import ``app.tracking`` (every call goes through ``LLMClient``) and
``app.core``; never ``app.api``, ``app.tasks`` or the database.
"""
