"""Sandbox: where repository code runs, and the workspace it runs in.

Owns running a command under isolation with its limits, cloning and checking a repository into
a task's workspace, and reading a test run's outcome. Imports nothing of ``app`` but
``app.core``: the rest of the code base calls it, never the other way round.
"""
