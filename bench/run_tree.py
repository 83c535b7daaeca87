"""Run one of these benchmark scripts against the ``app`` of another checkout: the same script,
the code before and after a change, side by side.

The venv's editable install always imports ``app`` from this tree; this runner drops that
finder and puts the other tree's ``backend/`` first, then runs the script from this ``bench/``:

    git worktree add /tmp/before <commit>
    cd backend && .venv/bin/python ../bench/run_tree.py /tmp/before llm_overhead_apis.py

The simulator subprocess the benchmarks start still runs this tree's ``app.simulator``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    root, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path[:0] = [str(BENCH), f"{root}/backend"]
    import app

    print(f"code: {app.__file__}", file=sys.stderr)
    sys.argv = [str(BENCH / script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
