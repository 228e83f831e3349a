"""`heap.freeze_startup_objects`, run in a process of its own (it changes the collector of the process
that calls it, as the coordinator's and the worker's command lines do)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc, weakref
from gputorrent import heap
from gputorrent.coordinator.app import create_app  # what the coordinator imports before it freezes
alive_before = len(gc.get_objects())
heap.freeze_startup_objects()
assert gc.get_freeze_count() >= alive_before // 2, (gc.get_freeze_count(), alive_before)
assert len(gc.get_objects()) < alive_before // 10  # a full collection no longer walks them

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze is garbage the collector still finds
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None
"""


def test_the_objects_of_a_start_are_frozen_and_later_garbage_is_still_collected() -> None:
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
