"""Start-up objects kept out of Python's full garbage collections (``gc.freeze``).

A relay process holds some hundreds of thousands of objects from its start-up (modules,
classes, functions, the libraries' tables) that live as long as it does. CPython's full
(generation 2) collection walks every one of them each time, and does so every few seconds
under load: 30-57 ms each in a listener measured at 1,500 msg/s, during which no session is
answered, so each one went straight into the acceptance p99 (docs/performance.md, "Issue 19,
third session"). Frozen once the reactor runs, they are never walked again; what the
relay allocates afterwards is collected as before. An object frozen that later becomes
garbage only through a reference cycle stays allocated: start-up makes few of those.

Called by the composition roots (the twistd plugin and a child process's main), never by a
library module: it changes the whole process.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

log = Logger()


def freeze_startup_objects() -> int:
    """Collect what start-up left as garbage, then freeze every object alive; returns how
    many objects are now frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("start-up objects frozen for the garbage collector: {count}", count=frozen)
    return frozen
