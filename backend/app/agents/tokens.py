"""Offline token estimates for prompt budgets: four characters a token, as the usage tracker
estimates tokens a provider did not report. No tokenizer: a budget must not need a download,
and only needs to be roughly right for every model."""

from __future__ import annotations

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
