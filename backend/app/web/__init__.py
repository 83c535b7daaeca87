"""The web console: server-rendered pages over the service's own data, at ``/``.

Owns the console's pages and fragments (``routes/``, mounted by ``mount.py``), its sign-in
session and CSRF tokens (``session.py``, ``security.py``), rendering and its security headers
(``render.py``), the view models its templates render (``overview.py``, ``tasklist.py``,
``taskpage.py``, ``usage.py``, ``budgets.py``), the few reads the API has no endpoint for
(``queries.py``), the short-lived sums of ended days (``cache.py``), and its templates and
vendored static files (``static/vendor/README.md``).

Who may see what is decided exactly as in the API: the principal comes from ``app.api.auth``
(open local mode, or an API key re-verified on every request) and every read goes through the
domain functions the API routers call (``app.tasks.store``, ``app.usage.report``,
``app.budgets.limits``, ``app.access.api_keys``), or, where the console reads what no endpoint
does, through ``queries.py`` with the same rule in the query.

May import everything the API may, and ``app.api`` itself (authentication, the request
guards, the session dependency and, for the task stream, submission and cancellation, the
API's own handlers); nothing imports ``app.web`` but ``app.main``.
"""
