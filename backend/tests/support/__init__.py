"""Helpers shared by test packages: processes the reliability and observability suites start,
and what they read back. Importable as ``tests.support`` (pytest's ``pythonpath`` setting)."""
