"""Access: API keys and the ``Principal`` a request acts as.

Owns issuing, verifying and revoking keys (stored only as hashes). May import ``app.core`` and
``app.models``; ``app.api.auth`` resolves a request to a principal with it.
"""
