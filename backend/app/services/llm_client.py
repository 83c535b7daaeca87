"""Re-export of :mod:`app.tracking.llm_client` at the seed's import path."""

from app.tracking.llm_client import AsyncLLMClient, LLMClient

__all__ = ["AsyncLLMClient", "LLMClient"]
