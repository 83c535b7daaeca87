"""Start-up clean-up: what the sandboxes of a killed service left behind.

A service killed with SIGKILL takes its sandboxes with it (bubblewrap's ``--die-with-parent``),
but its run cgroups and task workspaces stay. The next start kills whatever still runs in the
cgroups of dead owners and removes them, then deletes the workspaces no live process holds
(:meth:`Workspace.reap_stale`). Another live service's cgroups and workspaces are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.sandbox.cgroup import reap_cgroups
from app.sandbox.runner import Isolation, detect_isolation
from app.sandbox.workspace import Workspace


@dataclass(frozen=True)
class Reaped:
    cgroups: int
    workspaces: tuple[Path, ...]


def reap_leftovers(workspace_root: Path | None, isolation: Isolation | None = None) -> Reaped:
    """Kill and remove dead services' run cgroups, then their workspaces under
    ``workspace_root`` (default: the system temp dir)."""
    isolation = isolation or detect_isolation()
    cgroups = reap_cgroups(isolation.cgroups) if isolation.cgroups is not None else 0
    return Reaped(cgroups=cgroups, workspaces=tuple(Workspace.reap_stale(workspace_root)))
