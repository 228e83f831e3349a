"""The heap of a long-running process of the pool (the coordinator, a worker), once it has started."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive into the collector's permanent generation.

    What a process makes while it starts (its modules, the app and its routes, the settings) is
    never garbage, yet every full collection walked all of it again: under load one such pass
    held the coordinator for 63 ms, every request in flight waiting behind it (the B2 tail in
    docs/benchmarks.md). Frozen objects are never scanned again; what is made later is collected
    as before. Called by the command line, not by `create_app`, so a test process is left alone.
    """
    gc.collect()
    gc.freeze()
