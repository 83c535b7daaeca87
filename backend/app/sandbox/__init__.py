"""Sandbox: where repository code runs, and the workspace it runs in.

Owns running a command confined, with its limits (``runner``: bubblewrap in ``bwrap``, a cgroup
per command in ``cgroup``, the command and its output in ``command`` and ``output``), cloning
and checking a repository into a task's workspace (``workspace``), reading a test run's outcome
(``outcomes``) and reaping what a killed service left (``reap``). Imports nothing of ``app`` but
``app.core``: the rest of the code base calls it, never the other way round.
"""
