"""Notifications that are never lost: the outbox, its dispatcher, channels and subscriptions.

Owns the ``notification_*`` tables (``app.models.notifications``): channels (a signed webhook, a
Slack incoming webhook, SMTP e-mail), subscriptions (an administrator's, for anyone's events; a
user's, for their own), the outbox of events and the deliveries made from it.

- ``events``: the kinds of event, their deduplication ids and payloads, and their text;
- ``outbox``: ``record_event``, called by the domain where a fact happens, in that fact's own
  transaction (``budgets.guard``: a soft threshold crossed, a call blocked; the task orchestrator:
  a task finished); and the scan that tells of models seen without a price;
- ``signing``: the webhook's HMAC-SHA256 signature, for senders and receivers;
- ``channels``: each kind's settings (validated) and its sender, with bounded timeouts;
- ``store``: the SQL of fan-out, claims, retries and dead letters, channels and subscriptions;
- ``dispatcher``: the background thread of a service process (``Runtime.start_jobs``);
- ``service``: the rules the API applies (who sees which subscription, the test send).

``events`` and ``outbox`` import only ``core`` and ``models``, so any domain may record an
event without a cycle; the rest imports ``core``, ``models`` and ``schemas``.
"""
