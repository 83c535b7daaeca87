"""ASA backend: an automated software agent whose every LLM dollar is accounted for."""
