"""The service process's start-up heap, kept out of the garbage collector's way.

A full (generation 2) collection visits every container object the process holds. Once the
service has started that is some 250,000 objects (the modules, the price tables, SQLAlchemy's
and pydantic's structures), and visiting them took ~180 ms on the 2-core benchmark machine
(``bench/gc_stall.py``): 180 ms in which the event loop serves no request and completes no LLM
call. CPython runs such a collection whenever enough objects have outlived two younger
collections, which under load is every few seconds; tracked calls (whose state outlives more
collections than a raw SDK call's) brought it on about twice as often as raw ones.

Nearly all of those objects live as long as the process. ``freeze_startup_heap`` collects
once, then moves every survivor to the permanent generation (``gc.freeze``), which later
collections skip: a full collection then costs what was made since start-up (~1 ms in an idle
service, ~12 ms with 100 LLM calls in flight). Frozen objects are still freed when nothing
refers to them; only a reference cycle among them would outlive its last use, which is why the
heap is frozen once, when the service is ready.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_startup_heap() -> bool:
    """Collect, then freeze what survives; once per process (the first service started in it:
    a process that builds several, as the tests do, freezes the first one's heap only).
    True when this call froze it."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
    gc.collect()
    gc.freeze()
    return True
