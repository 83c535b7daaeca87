"""The service freezes its start-up heap once, so full collections stop visiting it.

Each test runs in a fresh interpreter: the test process's own heap may be frozen already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[2]

SERVICE = """
import gc, json, sys
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.main import create_app

settings = Settings(
    database_url=f"sqlite:///{sys.argv[1]}/asa.db", spool_dir=sys.argv[1] + "/spool",
    openai_api_key="", examples_dir=sys.argv[1] + "/examples",
)
before = gc.get_freeze_count()
with TestClient(create_app(settings)) as client:
    healthy = client.get("/health").status_code
    first = gc.get_freeze_count()
with TestClient(create_app(settings)) as client:
    second = gc.get_freeze_count()
unfrozen = len(gc.get_objects())
print(json.dumps({"before": before, "first": first, "second": second, "healthy": healthy,
                  "unfrozen": unfrozen}))
"""


def run_python(code: str, *args: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=BACKEND,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_service_freezes_its_startup_heap_once(tmp_path: Path) -> None:
    got = run_python(SERVICE, str(tmp_path))

    assert got["healthy"] == 200
    assert got["before"] == 0
    # Every object the started service held is in the permanent generation...
    assert got["first"] > 50_000
    # ...which full collections skip: what they still visit is a small part of the heap.
    assert got["unfrozen"] < got["first"] // 4
    # A second app in the same process (the tests build many) freezes nothing more (frozen
    # objects nothing refers to any longer are still freed: the count can only fall).
    assert got["second"] <= got["first"]


def test_freezing_keeps_what_is_in_use_and_frees_what_is_not() -> None:
    code = """
import gc, json, weakref
from app.core.heap import freeze_startup_heap

class Node:
    pass

kept = Node(); kept.me = kept                 # a cycle still referred to
dropped = Node(); dropped.me = dropped        # a cycle no longer referred to
gone = weakref.ref(dropped); del dropped
first = freeze_startup_heap()
again = freeze_startup_heap()
later = Node(); later.me = later              # made after the freeze
after = weakref.ref(later); del later
gc.collect()
print(json.dumps({"first": first, "again": again, "dropped_freed": gone() is None,
                  "kept": kept.me is kept, "later_freed": after() is None}))
"""
    got = run_python(code)

    # The collection before the freeze frees the start-up garbage; later garbage is collected.
    assert got == {
        "first": True,
        "again": False,
        "dropped_freed": True,
        "kept": True,
        "later_freed": True,
    }
