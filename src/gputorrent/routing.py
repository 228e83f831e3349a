"""Routing decisions: pure functions of a pool snapshot, no I/O.

Every policy answers one question, `choose(policy, model, workers, ...)`: which worker's queue a
new job goes to, or (`pull`) its model's shared queue, which every worker serving the model takes
from as soon as it has a free slot. Model-aware routing is implicit: a worker serves the fixed
list of models it registered with, already loaded, so the candidates are exactly the live workers
listing the model.

>>> pick_round_robin(["w1", "w2", "w3"], counter=5)
'w2'
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from gputorrent import keys
from gputorrent.protocol import EmbeddingRequest, InferenceRequest, Job, WorkerState

T = TypeVar("T")
Policy = Literal["round_robin", "least_loaded", "session_affinity", "pull"]
POLICIES: tuple[str, ...] = get_args(Policy)
AFFINITY_LOAD_FACTOR = 1.25  # a session's worker keeps it while its load is under this times its fair share
AFFINITY_PREFIX_CHARS = 512  # without a session id, requests sharing this much of their prompt share a worker


@dataclass(frozen=True)
class Route:
    """Where a job goes: a worker's own queue, or with `worker_id` None its model's shared queue."""

    worker_id: str | None


def candidates_for(model: str, workers: Sequence[WorkerState], cell: int | None = None) -> list[str]:
    """Ids of the live workers that serve `model` (with `cell`, those of that cell: a job moves only
    within its cell), in a stable order."""
    return [w.worker_id for w in live_for(model, workers) if cell is None or keys.cell_of(w.worker_id) == cell]


def hand_on_candidates(job: Job, workers: Sequence[WorkerState]) -> tuple[Job, list[str]]:
    """Where a job its worker cannot finish may go: (the job, the live workers of its cell serving its
    model), or, when only workers of other cells serve it, (the job made shared, []): its cell's shared
    queue, which they take from abroad. (the job, []) when no live worker serves it."""
    candidates = candidates_for(job.model, workers, keys.cell_of(job.request_id))
    if not candidates and candidates_for(job.model, workers):
        return job.model_copy(update={"shared": True}), []
    return job, candidates


def served_models(workers: Sequence[WorkerState]) -> list[str]:
    """Every model at least one live worker serves, sorted."""
    return sorted({m for w in workers if w.state == "alive" for m in w.models})


def pick_round_robin(candidates: Sequence[T], counter: int) -> T:
    """The seed's policy: the counter (1-based, from INCR) walks the candidates in turn."""
    return candidates[(counter - 1) % len(candidates)]


def needs_counter(policy: str) -> bool:
    """Whether `choose` needs the shared round-robin counter (`worker_index`) for this policy."""
    return policy == "round_robin"


def choose(
    policy: str, model: str, workers: Sequence[WorkerState], *, counter: int = 1, affinity_key: str | None = None
) -> Route | None:
    """Where a job for `model` goes under `policy`; None when no live worker serves the model."""
    return choose_among(policy, live_for(model, workers), counter=counter, affinity_key=affinity_key)


def live_for(model: str, workers: Sequence[WorkerState]) -> list[WorkerState]:
    """The live workers that serve `model`, by id: a job's candidates."""
    return sorted((w for w in workers if w.state == "alive" and model in w.models), key=lambda w: w.worker_id)


def choose_among(
    policy: str, live: Sequence[WorkerState], *, counter: int = 1, affinity_key: str | None = None,
    pending: Mapping[str, int] | None = None, speed: float | None = None, ring: AffinityRing | None = None,
) -> Route | None:  # fmt: skip
    """`choose` over candidates already found (`live_for`), sorted by id. `pending`: jobs queued for
    each since the candidates were read; `speed`: their `pool_speed`, and `ring`: their `AffinityRing`,
    if made already."""
    if not live:
        return None
    if policy == "pull":
        return Route(worker_id=None)
    pending = pending or {}
    if policy == "least_loaded" or (policy == "session_affinity" and affinity_key is None):
        return Route(worker_id=pick_least_loaded(live, pending, speed))
    if policy == "session_affinity" and affinity_key is not None:
        return Route(worker_id=pick_affine(live, affinity_key, pending, speed, ring))
    return Route(worker_id=pick_round_robin(live, counter).worker_id)


def outstanding(worker: WorkerState, pending: Mapping[str, int] | None = None) -> int:
    """Jobs a worker has to get through: queued for it alone (with those `pending` since the read), and held."""
    return worker.queue_length + worker.jobs_held + (pending or {}).get(worker.worker_id, 0)


def expected_finish(worker: WorkerState, default_speed: float, pending: Mapping[str, int] | None = None) -> float:
    """How long a new job would take to finish on `worker`, in units of a job at unit speed.

    With a free slot it starts at once; otherwise it waits for the jobs ahead of it, spread over
    the worker's slots. A worker that has not measured its speed yet counts as `default_speed`.
    """
    waiting = max(0, outstanding(worker, pending) - worker.slots + 1)
    return (1 + waiting / worker.slots) / (worker.tokens_per_s or default_speed)


# Past this many candidates least-loaded compares a random few instead of all (the power of d
# choices): a request costs the same at 10,000 workers as at 60, and on a snapshot that is a
# moment old, sampling spreads a burst where the one least loaded worker would draw all of it.
LEAST_LOADED_EXACT_MAX = 64
LEAST_LOADED_SAMPLE = 4


def pick_least_loaded(
    live: Sequence[WorkerState], pending: Mapping[str, int] | None = None, speed: float | None = None
) -> str:
    """The worker that would finish a new job first: jobs queued and in flight, weighted by speed."""
    speed = pool_speed(live) if speed is None else speed
    if len(live) <= LEAST_LOADED_EXACT_MAX:
        best = min(live, key=lambda w: (expected_finish(w, speed, pending), outstanding(w, pending), w.worker_id))
    else:  # a tie goes to the sample's own (random) order: by id, the lowest ids would draw most of an idle pool's jobs
        sample = random.sample(live, LEAST_LOADED_SAMPLE)
        best = min(sample, key=lambda w: (expected_finish(w, speed, pending), outstanding(w, pending)))
    return best.worker_id


def pool_speed(workers: Sequence[WorkerState]) -> float:
    """The median measured speed (tokens/s), for workers that have none yet; 1.0 when nobody measured."""
    known = [w.tokens_per_s for w in workers if w.tokens_per_s]
    return statistics.median(known) if known else 1.0


def pick_affine(
    live: Sequence[WorkerState], key: str, pending: Mapping[str, int] | None = None, speed: float | None = None,
    ring: AffinityRing | None = None,
) -> str:  # fmt: skip
    """The worker `key` hashes to, while it is not overloaded (bounded-load rendezvous hashing).

    Each worker ranks by a hash of key and worker id, so adding or losing a worker moves only the
    keys that ranked it first. A worker keeps the key while its load (with the new job) stays
    within `AFFINITY_LOAD_FACTOR` of its share of the pool's, by its slots; past that the next in
    rank takes it, and past every bound `pick_least_loaded`'s choice does. Past
    `AFFINITY_EXACT_MAX` candidates the rank is the walk of `affinity_ring(live)` from the key's
    point instead (consistent hashing, with the same property), so a request does not hash them all.
    """
    pending = pending or {}
    if walks_a_ring(live):
        ring = ring or affinity_ring(live)
        pending_here = sum(jobs for worker_id, jobs in pending.items() if worker_id in ring.worker_ids)
        total, capacity = ring.load + pending_here + 1, ring.capacity
        ranked: Iterable[WorkerState] = itertools.islice(ring.walk(key), AFFINITY_RING_WALK)
    else:
        total, capacity = sum(outstanding(w, pending) for w in live) + 1, sum(w.slots for w in live)
        ranked = sorted(live, key=lambda w: hashlib.sha256(f"{key}\0{w.worker_id}".encode()).digest(), reverse=True)
    for worker in ranked:
        bound = max(worker.slots, math.ceil(AFFINITY_LOAD_FACTOR * total * worker.slots / capacity))
        if outstanding(worker, pending) + 1 <= bound:
            return worker.worker_id
    return pick_least_loaded(live, pending, speed)


AFFINITY_EXACT_MAX = 64  # past this many candidates, session affinity walks a ring (`affinity_ring`)
AFFINITY_RING_POINTS = 8  # points a worker has on the ring: more spread the keys more evenly
AFFINITY_RING_WALK = 32  # workers a key tries along the ring before the least loaded takes it


def walks_a_ring(live: Sequence[WorkerState]) -> bool:
    """Whether session affinity over these candidates walks their `affinity_ring`, not ranks them all."""
    return len(live) > AFFINITY_EXACT_MAX


@dataclass(frozen=True)
class AffinityRing:
    """A model's candidates as points on a hash ring, made once per read of the pool: a key's rank of
    workers is the distinct owners of the points from its hash on (consistent hashing)."""

    points: list[int]  # sorted
    owners: list[WorkerState]  # of each point
    load: int  # jobs queued for and held by all the candidates, as read
    capacity: int  # their slots
    worker_ids: frozenset[str]

    def walk(self, key: str) -> Iterator[WorkerState]:
        start = bisect.bisect_left(self.points, _ring_hash(key))
        seen: set[str] = set()
        for i in range(len(self.points)):
            owner = self.owners[(start + i) % len(self.points)]
            if owner.worker_id not in seen:
                seen.add(owner.worker_id)
                yield owner


def affinity_ring(live: Sequence[WorkerState]) -> AffinityRing:
    """The ring of these candidates (a few hashes per candidate: made once per read, not per request)."""
    placed = sorted(
        (_ring_hash(f"{w.worker_id}\0{point}"), w.worker_id, w) for w in live for point in range(AFFINITY_RING_POINTS)
    )
    return AffinityRing(
        points=[point for point, _, _ in placed], owners=[w for _, _, w in placed],
        load=sum(outstanding(w) for w in live), capacity=sum(w.slots for w in live),
        worker_ids=frozenset(w.worker_id for w in live),
    )  # fmt: skip


def _ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def affinity_key(request: InferenceRequest | EmbeddingRequest) -> str | None:
    """What session affinity keeps together: the session id, else the start of the prompt (for a
    chat, the conversation before its last message), so a worker's prompt cache is reused."""
    if isinstance(request, EmbeddingRequest):
        return None
    if request.session_id is not None:
        return f"session:{request.session_id}"
    if request.prompt is not None:
        return f"prefix:{request.prompt[:AFFINITY_PREFIX_CHARS]}"
    messages = request.messages or []
    history = messages[:-1] or messages
    return "prefix:" + "\0".join(f"{m.role}:{m.content}" for m in history)[:AFFINITY_PREFIX_CHARS]
