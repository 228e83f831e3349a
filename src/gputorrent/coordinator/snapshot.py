"""The pool as this coordinator last read it: one read of Redis serves every request of a moment.

Admission routes on it, and the pool-wide readers (the listings, the dashboard, metrics, the
reaper) read it rather than the registry, so their cost does not grow with the requests: a read
walks every worker (`registry.snapshot`), which at 10,000 workers is a fifth of a second of the
coordinator's time and a tenth of Redis's.

When it is read again: `max_age_s()` is `SNAPSHOT_MAX_AGE_S`, or in a large pool (more than
`LARGE_POOL_WORKERS`) `READ_COST_FACTOR` times the last read's duration, so reading it takes at
most a twentieth of the coordinator's time whatever the pool's size. Admission reads it behind an
admitted request once it is older than that, so requests coming less often do not each wait for
the read; before routing only after a quiet spell (older than `SNAPSHOT_STALE_MAX_S`, or twice
the large pool's bound), when no live worker serves the model (one may have joined elsewhere; in a
large pool only once the snapshot is past `max_age_s()`, so a client asking for a model nobody
serves cannot make every request a read), and in a small pool when a worker registered (or began
to serve a model) through this coordinator since the read began. The other readers read it
afresh in a small pool (what they show is then never older than the call), else take it as it is
within `max_age_s()`. Liveness is checked again when a job is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import weakref
from collections import Counter, defaultdict
from collections.abc import Sequence

from gputorrent import keys, registry, routing
from gputorrent.protocol import WorkerState
from gputorrent.redis_client import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)

SNAPSHOT_MAX_AGE_S = 0.1
SNAPSHOT_STALE_MAX_S = 1.0
READ_COST_FACTOR = 20
LARGE_POOL_WORKERS = 500  # past this many workers a read takes long enough to be bounded by its cost


class PoolSnapshot:
    """The pool as last read, indexed by model, with the jobs this coordinator queued since added to
    the workers they went to, until their results are announced or a read that began after them
    shows them (so a burst of requests spreads as if each had read the pool, and a session's next
    request finds its worker as free as it is)."""

    def __init__(self) -> None:
        self.workers: list[WorkerState] = []  # every registered worker, as read
        self._read_at = -math.inf  # when the last read began (the event loop's clock)
        self._read_cost_s = 0.0  # how long the last read took
        self._joined_at = -math.inf  # when a worker last joined (or took a model) through this coordinator
        self._live: dict[str, list[WorkerState]] = {}  # model -> the live workers serving it, by id
        self._speed: dict[str, float] = {}  # model -> `routing.pool_speed` of its live workers
        self._queued: Counter[str] = Counter()  # model -> jobs queued at the workers serving it
        self._pending: dict[str, tuple[str, str]] = {}  # request id -> (worker id, model): queued since the read
        self._pending_at: Counter[str] = Counter()  # worker id -> its jobs in `_pending`
        self._pending_for: Counter[str] = Counter()  # model -> its jobs in `_pending`
        # (model, cell or None) -> its candidates' ring, and (model, cell) -> its live workers in the cell:
        # each made when first asked after a read
        self._rings: dict[tuple[str, int | None], routing.AffinityRing] = {}
        self._live_in: dict[tuple[str, int], list[WorkerState]] = {}
        self._slots_by_cell: dict[str, Counter[int]] = {}  # model -> its live workers' slots in each cell
        self._reading: asyncio.Task[None] | None = None
        self._known = registry.KnownRecords()  # the records read last: read again only when the registry changed

    def max_age_s(self) -> float:
        return max(SNAPSHOT_MAX_AGE_S, self._cost_bound_s())

    def _large(self) -> bool:
        return len(self.workers) > LARGE_POOL_WORKERS

    def _cost_bound_s(self) -> float:
        """`READ_COST_FACTOR` times the last read's duration in a large pool; 0 in a small one (decided by
        its size, not by a duration that a busy moment could stretch)."""
        return READ_COST_FACTOR * self._read_cost_s if self._large() else 0.0

    def _age_s(self) -> float:
        return asyncio.get_running_loop().time() - self._read_at

    async def for_routing(self, redis: RedisClient, *, missed: bool = False, fresh: bool = False) -> None:
        """Read the pool before routing after a quiet spell (older than the stale bound); when `missed`
        (no live worker serves the model: one may have joined), unless a large pool was read within
        `max_age_s()`; in a small pool when a worker joined here since the read began (a read that
        began after it will do); and always when `fresh`."""
        age_s = self._age_s()
        stale = age_s > max(SNAPSHOT_STALE_MAX_S, 2 * self._cost_bound_s())
        if fresh or stale or (missed and (not self._large() or age_s > self.max_age_s())):
            await self._read(redis)
        elif self._joined_at >= self._read_at and not self._large():
            await self._read(redis, since=self._joined_at)

    def joined(self) -> None:
        """A worker registered, or began to serve a model, through this coordinator: in a small pool the
        next request routes on a read that shows it. (In a large pool, or through another coordinator,
        it shows at the next read: within `SNAPSHOT_STALE_MAX_S` in a small pool.)"""
        self._joined_at = asyncio.get_running_loop().time()

    async def current(self, redis: RedisClient) -> list[WorkerState]:
        """Every registered worker, for a reader of the whole pool (see the module's docstring)."""
        if not self._large() or self._age_s() > self.max_age_s():
            await self._read(redis)
        return self.workers

    def choose(
        self, policy: str, model: str, *, counter: int, affinity_key: str | None, cell: int | None = None
    ) -> routing.Route | None:
        """`routing.choose` on this snapshot, its pending jobs counted; its cost does not grow with the
        pool (session affinity's ring of a model is made once per read, at its first use). With `cell`
        (a request that names itself is admitted in its name's cell), among that cell's workers only:
        the cell's shared queue when none of them serves the model and others do."""
        live = self._live.get(model, [])
        if len(keys.cells()) == 1:
            cell = None  # every worker's: one ring and one list a model
        if cell is not None and live:
            if (model, cell) not in self._live_in:
                self._live_in[(model, cell)] = [w for w in live if keys.cell_of(w.worker_id) == cell]
            live = self._live_in[(model, cell)]
            if not live:
                return routing.Route(worker_id=None)
        ring = None
        if policy == "session_affinity" and affinity_key is not None and routing.walks_a_ring(live):
            ring = self._rings.get((model, cell))
            if ring is None:
                ring = self._rings[(model, cell)] = routing.affinity_ring(live)
        return routing.choose_among(
            policy, live, counter=counter, affinity_key=affinity_key, pending=self._pending_at,
            speed=self._speed.get(model), ring=ring,
        )  # fmt: skip

    def orphaned(self) -> list[tuple[int, str, list[str]]]:
        """(cell, model, live workers of other cells that serve it) for every cell whose shared queue of a
        model holds jobs while no live worker of that cell serves the model: they take from abroad."""
        found = []
        for (cell, model), queued in self._known.shared_queued.items():
            live = self._live.get(model, [])
            if queued and live and not any(keys.cell_of(w.worker_id) == cell for w in live):
                found.append((cell, model, [w.worker_id for w in live]))
        return found

    def held_abroad(self) -> set[tuple[int, str]]:
        """(cell, worker id) for every worker that holds jobs in a cell other than its own (`queue.pop`)."""
        return self._known.held_abroad

    def shared_cell(self, model: str) -> int:
        """The cell whose shared queue of `model` a job goes to: drawn in proportion to the slots of the
        model's live workers in each cell (cell 0 when none is live)."""
        live = self._live.get(model, [])
        if len(keys.cells()) == 1 or not live:
            return keys.HOME_CELL
        if (slots := self._slots_by_cell.get(model)) is None:
            slots = self._slots_by_cell[model] = Counter()
            for worker in live:
                slots[keys.cell_of(worker.worker_id)] += worker.slots
        return random.choices(list(slots), weights=list(slots.values()))[0]

    def queued_for(self, model: str, but_cell: int | None = None) -> int:
        """Jobs queued at the workers serving `model`, with those this coordinator queued since the read,
        and, with `but_cell`, those in the model's shared queues of every other cell (the admission of a
        job of `but_cell` counts that cell's shared queue itself, exactly)."""
        queued = self._queued[model] + self._pending_for[model]
        if but_cell is not None:
            shared = self._known.shared_queued
            queued += sum(n for (cell, name), n in shared.items() if name == model and cell != but_cell)
        return queued

    def left(self, worker_id: str) -> None:
        """The worker left since the read (a job routed to it was refused): route no more to it until the next."""
        for model, live in self._live.items():
            if any(w.worker_id == worker_id for w in live):
                self._live[model] = [w for w in live if w.worker_id != worker_id]
                self._rings = {at: ring for at, ring in self._rings.items() if at[0] != model}
                self._live_in = {at: cell for at, cell in self._live_in.items() if at[0] != model}
                self._slots_by_cell.pop(model, None)

    def queued(self, redis: RedisClient, request_id: str, worker_id: str | None, model: str) -> None:
        """This coordinator queued the job for `worker_id` (None: on a shared queue). A snapshot past
        `max_age_s()` is read again now, off the admitted request's way, for the next one."""
        if worker_id is not None:
            self.announced(request_id)  # an id queued again while pending: counted once
            self._pending[request_id] = (worker_id, model)
            self._pending_at[worker_id] += 1
            self._pending_for[model] += 1
        if self._age_s() > self.max_age_s() and (self._reading is None or self._reading.done()):
            self._reading = self._start_read(redis)

    def announced(self, request_id: str) -> None:
        """The job's result was announced: if it was this coordinator's, it no longer weighs on its worker."""
        if (pending := self._pending.pop(request_id, None)) is not None:
            worker_id, model = pending
            _uncount(self._pending_at, worker_id)
            _uncount(self._pending_for, model)

    async def close(self) -> None:
        """Stop a read in progress (the app is stopping)."""
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, *REDIS_FAILURES):
                await self._reading

    async def _read(self, redis: RedisClient, since: float | None = None) -> None:
        """Read the pool, in a read that began after this call (or after `since`): one under way is
        joined, and another started after it where it began before (one read at a time, however many
        readers ask)."""
        asked_at = asyncio.get_running_loop().time() if since is None else since
        while self._read_at < asked_at:
            if self._reading is None or self._reading.done():
                self._reading = self._start_read(redis)
            await asyncio.shield(self._reading)

    def _start_read(self, redis: RedisClient) -> asyncio.Task[None]:
        reading = asyncio.create_task(self._read_now(redis), name="pool snapshot")
        reading.add_done_callback(_note_failure)
        return reading

    async def _read_now(self, redis: RedisClient) -> None:
        counted = list(self._pending)  # jobs queued while the read is on its way may be missing from it
        started = asyncio.get_running_loop().time()
        workers = await registry.snapshot(redis, self._known)
        self._index(workers)
        self._read_at, self._read_cost_s = started, asyncio.get_running_loop().time() - started
        for request_id in counted:
            self.announced(request_id)

    def _index(self, workers: Sequence[WorkerState]) -> None:
        live: defaultdict[str, list[WorkerState]] = defaultdict(list)
        queued: Counter[str] = Counter()
        for worker in workers:  # sorted by id: so is each model's list
            for model in worker.models:
                queued[model] += worker.queue_length
                if worker.state == "alive":
                    live[model].append(worker)
        self.workers, self._live, self._queued = list(workers), dict(live), queued
        self._rings, self._live_in, self._slots_by_cell = {}, {}, {}
        self._speed = {model: routing.pool_speed(candidates) for model, candidates in live.items()}


def _uncount(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:  # not kept at 0: the keys would grow with every worker and model ever seen
        del counter[key]


def _note_failure(reading: asyncio.Task[None]) -> None:
    """Retrieve a failed read's error: a read behind an admission may have nobody waiting on it (the
    next admission reads again, and reports the outage)."""
    if not reading.cancelled() and (error := reading.exception()) is not None:
        log.debug("the pool snapshot could not be read: %s", error)


# One per Redis client, which is one per coordinator app (a test's app does not see another's pool).
_snapshots: weakref.WeakKeyDictionary[RedisClient, PoolSnapshot] = weakref.WeakKeyDictionary()


def pool_snapshot(redis: RedisClient) -> PoolSnapshot:
    """The snapshot kept for the app whose Redis client this is."""
    return _snapshots.setdefault(redis, PoolSnapshot())


async def current_pool(redis: RedisClient) -> list[WorkerState]:
    """Every registered worker, for a reader of the whole pool: `PoolSnapshot.current` of the app's snapshot."""
    return await pool_snapshot(redis).current(redis)
