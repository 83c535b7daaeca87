"""Budgets: limits per task, user and day, reserved before a call and settled after it.

Owns the reservation guard, the counter and override SQL, the admin-facing limit operations and
the cross-process override signal. May import ``app.core``, ``app.models`` and
``app.tracking``'s records and prices; never ``app.api``.
"""
