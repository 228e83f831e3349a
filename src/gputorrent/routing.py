"""Routing decisions: pure functions of a pool snapshot, no I/O.

>>> pick_round_robin(["w1", "w2", "w3"], counter=5)
'w2'
"""

from __future__ import annotations

from collections.abc import Sequence

from gputorrent.protocol import WorkerState


def candidates_for(model: str, workers: Sequence[WorkerState]) -> list[str]:
    """Ids of the live workers that serve `model`, in a stable order."""
    return sorted(w.worker_id for w in workers if w.state == "alive" and model in w.models)


def served_models(workers: Sequence[WorkerState]) -> list[str]:
    """Every model at least one live worker serves, sorted."""
    return sorted({m for w in workers if w.state == "alive" for m in w.models})


def pick_round_robin(candidates: Sequence[str], counter: int) -> str:
    """The seed's policy: the counter (1-based, from INCR) walks the candidates in turn."""
    return candidates[(counter - 1) % len(candidates)]
