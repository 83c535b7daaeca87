"""Pydantic models of the HTTP API's requests and responses (what ``/docs`` shows)."""
