"""Hands the jobs of dead workers to live ones, and ends jobs past their deadline. Every coordinator
runs one; they need no coordination.

A worker is dead once its heartbeat key has expired. Its queued jobs move to a live worker
serving the model; the jobs it held (its processing list) move too, with their attempt
counted, and past `max_attempts` they fail with code `worker_lost`, so one job that kills
every worker it touches cannot take the pool down. Each move is one Lua script that first
removes the job from the dead worker's list, so two reapers never move a job twice.

An expired key proves a worker dead only if Redis could be reached for the whole heartbeat
timeout before: while Redis is away no worker can beat, and every key lapses. So a reaper judges
only once it has seen Redis without a break for a full timeout (`Sight`), and one that sees it
again after a break also writes `liveness:grace` for the others (checked in the move scripts).

A dead worker's lists are read until found empty; after that only when the lengths index shows a
job in them (or every `FULL_LOOK_ROUNDS`), so a round costs what the dead workers with jobs cost.
A worker dead for `dead_worker_retention_s` (from the first round of any coordinator's reaper
that judged it dead: `keys.dead_since`, read again only when the dead workers change) whose lists
are empty leaves the registry (`registry.forget_dead`): a pool that workers join and leave for good
does not keep every one it ever had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable

from gputorrent import handoff, keys, pool_stats, queue, registry
from gputorrent.coordinator.snapshot import current_pool, pool_snapshot
from gputorrent.protocol import ErrorInfo, WorkerState
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.telemetry import FailureRecord

log = logging.getLogger(__name__)

OVERDUE_BATCH = 256  # deadlines handled per round; the rest wait for the next round
ABROAD_TAKERS = 2  # workers asked each round to take from a cell whose shared queue no worker of its own serves
# A dead worker found with empty lists is not read again while the lengths index shows nothing
# for it, except every this many rounds (a minute by default): a list changed by hand, which
# the index does not see, is still found.
FULL_LOOK_ROUNDS = 30
DEADLINE_PASSED = ErrorInfo(code="timeout", message="the request passed its deadline (timeout_s) before it finished")


def _unix_s(text: bytes | str | None, default: float) -> float:
    """A `dead_since` entry; `default` when absent or not a number (written by hand)."""
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default


class Sight:
    """How long this coordinator has seen Redis without a break, on `clock` (monotonic seconds).

    A break is a failed call (`lost`), or two replies further apart than `max_gap_s`: Redis paused,
    or this coordinator's loop stalled, so nothing it could see either way. A new coordinator has
    not seen Redis yet: it starts blind.
    """

    def __init__(self, max_gap_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_gap_s = max_gap_s
        self._clock = clock
        self._since: float | None = None  # when the current unbroken sight began; None: blind
        self._last_reply: float | None = None
        self._looked = False  # any reply or failure before: a new coordinator's first look is no break

    def saw(self) -> bool:
        """A reply from Redis just came; True when it ends a break (not the first look ever)."""
        now = self._clock()
        broken = self._last_reply is None or now - self._last_reply > self._max_gap_s
        if broken:
            self._since = now
        self._last_reply = now
        regained, self._looked = broken and self._looked, True
        return regained

    def lost(self) -> None:
        """A call to Redis failed."""
        self._since = self._last_reply = None
        self._looked = True

    def seen_for_s(self) -> float:
        return 0.0 if self._since is None else self._clock() - self._since


class Reaper:
    """Runs `reap_once()` and `end_overdue()` every `interval_s` until `stop()`.

    It judges workers dead only once it has seen Redis for `heartbeat_timeout_s` without a break
    (0: at once); the jobs of dead workers move only while `liveness:grace` is absent. A dead worker
    with empty lists leaves the registry once dead for `dead_worker_retention_s` (never, unless
    given: the app gives `GPUTORRENT_DEAD_WORKER_RETENTION_S`).
    """

    def __init__(
        self, redis: RedisClient, interval_s: float, max_attempts: int, result_ttl_s: int, *,
        heartbeat_timeout_s: float, dead_worker_retention_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._wall_clock = wall_clock  # `dead_since` is compared across coordinators: unix time (keep them in sync)
        self._dead_worker_retention_s = dead_worker_retention_s
        self._found_empty: set[str] = set()  # dead workers whose lists this reaper found empty since
        # `dead_since` as last read, and the dead workers it was read for: read again only when they
        # change (or every `FULL_LOOK_ROUNDS`), since at thousands of dead workers it is a large hash
        self._dead_since: dict[str, float] = {}
        self._rounds = 0
        self._interval_s = interval_s
        self._max_attempts = max_attempts
        self._result_ttl_s = result_ttl_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        # A round comes every interval: more than half an interval late is a break. A worker keeps its
        # key (a timeout of beats, usually 3 intervals) through an outage that short.
        self.sight = Sight(max_gap_s=1.5 * interval_s, clock=clock)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.reap_once()
                await self.end_overdue()
                await self._saw()
            except REDIS_FAILURES as e:
                self.sight.lost()
                log.warning("reaper cannot reach Redis (%s)", e)
            except Exception:  # the outermost boundary of a background duty: log, keep going
                log.exception("reaper round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def _saw(self) -> None:
        """Note a reply from Redis; after a break, hold every reaper off for a heartbeat timeout."""
        if self.sight.saw() and self._heartbeat_timeout_s > 0:
            # Workers (and those beating through this coordinator's /worker routes) could not beat
            # during the break either: each gets a full timeout to beat again, whoever judges.
            grace_ms = max(1, round(self._heartbeat_timeout_s * 1000))
            async with self._redis.pipeline(transaction=False) as pipe:
                for cell in keys.cells():  # each cell's move scripts read their own
                    pipe.set(keys.liveness_grace(cell), "1", px=grace_ms)
                await pipe.execute()
            log.warning(
                "reaper sees Redis again after a break; no worker is judged dead for %g s", self._heartbeat_timeout_s
            )

    async def reap_once(self) -> int:
        """Move (or fail) every job of every dead worker once; returns how many were handled.

        Nothing moves before this reaper has seen Redis for a full heartbeat timeout, nor while
        `liveness:grace` holds."""
        workers = await current_pool(self._redis)
        await self._saw()
        if len(keys.cells()) > 1:
            await self._call_from_abroad()
        dead_workers = [w for w in workers if w.state == "dead"]
        dead_now = {w.worker_id for w in dead_workers}
        held_abroad = pool_snapshot(self._redis).held_abroad()
        if not dead_now:
            # Whoever wrote them, entries left for workers alive again or gone must not date a later death.
            async with self._redis.pipeline(transaction=False) as pipe:
                for cell in keys.cells():
                    pipe.delete(keys.dead_since(cell))
                await pipe.execute()
            self._dead_since = {}
            if not held_abroad:
                return 0
        # A break in sight leaves `dead_since` as it is: the retention is not started again by every
        # blip (the removal itself checks, in its script, that the worker is dead with nothing held).
        if self.sight.seen_for_s() < self._heartbeat_timeout_s:
            return 0
        # Written in every cell at once; the move scripts check their own cell's too, atomically.
        if await self._redis.exists(keys.liveness_grace(keys.HOME_CELL)):
            return 0
        handled = await self._reap_abroad(held_abroad, workers)
        if dead_now:
            handled += await self._reap_dead(dead_workers, workers)
        return handled

    async def _call_from_abroad(self) -> None:
        """Ask a few live workers of a model, of other cells, to take from each cell whose shared queue
        of the model holds jobs that no live worker of that cell serves (`keys.abroad_key`, and a ring of
        their doorbells), every round while it does."""
        orphaned = pool_snapshot(self._redis).orphaned()
        if not orphaned:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for cell, _, takers in orphaned:
                for worker_id in random.sample(takers, min(len(takers), ABROAD_TAKERS)):
                    pipe.sadd(keys.abroad_key(worker_id), str(cell))
                    pipe.expire(keys.abroad_key(worker_id), queue.ABROAD_HINT_TTL_S)
                    pipe.lpush(keys.worker_doorbell_key(worker_id), "1")
                    pipe.ltrim(keys.worker_doorbell_key(worker_id), 0, keys.DOORBELL_MAX - 1)
            await pipe.execute()

    async def _reap_abroad(self, held_abroad: set[tuple[int, str]], workers: list[WorkerState]) -> int:
        """Hand on the jobs that workers took from other cells than their own and hold there while their
        presence in that cell lapsed (`queue.pop`): the worker died, or lost Redis, as for a dead worker."""
        if not held_abroad:
            return 0
        holders = sorted(held_abroad)
        async with self._redis.pipeline(transaction=False) as pipe:
            for cell, worker_id in holders:
                pipe.exists(keys.heartbeat_key(worker_id, cell))
            present = await pipe.execute()
        handled = 0
        for (cell, worker_id), here in zip(holders, present, strict=True):
            if not here:
                handled += await handoff.hand_on(
                    self._redis, worker_id, keys.processing_key(worker_id, cell), workers, count_attempt=True,
                    max_attempts=self._max_attempts, ttl_s=self._result_ttl_s, only_if_dead=True,
                )  # fmt: skip
                await self._saw()
        return handled

    async def _reap_dead(self, dead_workers: list[WorkerState], workers: list[WorkerState]) -> int:
        """Hand on the jobs of the dead workers' own lists, and remove those dead past the retention."""
        dead_now = {w.worker_id for w in dead_workers}
        now = self._wall_clock()
        self._rounds += 1
        full_look = self._rounds % FULL_LOOK_ROUNDS == 0
        if full_look:
            self._found_empty.clear()
        self._found_empty &= dead_now
        dead_since = await self._read_dead_since(dead_now, now, again=full_look)
        handled = 0
        for dead in dead_workers:
            # Found empty while dead, and the lengths index still shows nothing: only a dead worker's
            # own move could fill its lists, and every script that fills one writes the index.
            if dead.worker_id not in self._found_empty or dead.queue_length or dead.jobs_held:
                handled += await self._hand_on_lists(dead.worker_id, workers)
            if now - dead_since[dead.worker_id] < self._dead_worker_retention_s:
                continue
            if not await self._past_retention(dead.worker_id, now):
                continue
            if await registry.forget_dead(self._redis, dead.worker_id):
                await self._redis.hdel(keys.dead_since(keys.cell_of(dead.worker_id)), dead.worker_id)
                log.info("worker %s left the registry: dead with nothing left to hand on", dead.worker_id)
        return handled

    async def _read_dead_since(self, dead_now: set[str], now: float, *, again: bool) -> dict[str, float]:
        """When each dead worker was first judged dead, by this reaper or another (`keys.dead_since`):
        the workers new to it are written as dead since `now` (`HSETNX`: the first coordinator's time
        stands), those alive again or gone are taken out. Read from Redis when the dead workers are not
        those of the last read, or `again`; else the last read stands (`_past_retention` reads one
        entry again before a removal, so an entry another coordinator wrote since never comes late)."""
        if not again and dead_now == self._dead_since.keys():
            return self._dead_since
        by_cell = [await self._redis.hgetall(keys.dead_since(cell)) for cell in keys.cells()]
        recorded: dict[str, str] = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for cell, entries in zip(keys.cells(), by_cell, strict=True):
                dead = {worker_id for worker_id in dead_now if keys.cell_of(worker_id) == cell}
                for worker_id in dead - entries.keys():
                    pipe.hsetnx(keys.dead_since(cell), worker_id, repr(now))
                if gone := entries.keys() - dead:
                    pipe.hdel(keys.dead_since(cell), *gone)
                recorded.update({str(worker_id): str(since) for worker_id, since in entries.items()})
            await pipe.execute()
        self._dead_since = {worker_id: _unix_s(recorded.get(worker_id), now) for worker_id in dead_now}
        return self._dead_since

    async def _past_retention(self, worker_id: str, now: float) -> bool:
        """Whether the worker's `dead_since` entry, read now, is older than the retention: the entry read
        before may be gone since (the worker registered again, and died again) or another's, earlier."""
        recorded = await self._redis.hget(keys.dead_since(keys.cell_of(worker_id)), worker_id)
        if recorded is None:
            await self._redis.hsetnx(keys.dead_since(keys.cell_of(worker_id)), worker_id, repr(now))
            self._dead_since[worker_id] = now
            return False
        self._dead_since[worker_id] = since = _unix_s(recorded, now)
        return now - since >= self._dead_worker_retention_s

    async def _hand_on_lists(self, worker_id: str, workers: list[WorkerState]) -> int:
        """Hand on the jobs of a dead worker's lists that hold any (their lengths read in one round trip)."""
        # Queued jobs first, then the started ones: each move goes to the front of its new queue,
        # so the jobs that were already running are the next to run again, not the last.
        lists = [(False, queued_in) for queued_in in keys.worker_queue_keys(worker_id)]
        lists += [(True, keys.processing_key(worker_id))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, source in lists:
                pipe.llen(source)
            lengths = await pipe.execute()
        await self._saw()  # a long round is no break
        if not any(lengths):
            self._found_empty.add(worker_id)
            return 0
        handled = 0
        for (started, source), length in zip(lists, lengths, strict=True):
            if length:
                handled += await handoff.hand_on(
                    self._redis, worker_id, source, workers, count_attempt=started,
                    max_attempts=self._max_attempts, ttl_s=self._result_ttl_s, only_if_dead=True,
                )  # fmt: skip
                await self._saw()  # a long round of moves is no break
        return handled

    async def end_overdue(self) -> int:
        """End every job past its deadline as failed with code `timeout`; returns how many were ended.

        The worker of a running job also stops at its own deadline check; whichever acts first
        writes the one result.
        """
        overdue: list[str] = []
        for cell in keys.cells():
            due = await self._redis.zrangebyscore(keys.deadlines(cell), "-inf", time.time(), start=0, num=OVERDUE_BATCH)
            overdue += map(str, due)
        ended = 0
        for request_id in overdue:
            if (result := await queue.end(self._redis, request_id, DEADLINE_PASSED, self._result_ttl_s)) is not None:
                ended += 1
                await pool_stats.record_failure(self._redis, FailureRecord(
                    at=time.time(), request_id=request_id, model=result.model, worker_id=result.worker_id,
                    code=DEADLINE_PASSED.code, message=DEADLINE_PASSED.message,
                ))  # fmt: skip
            elif not await self._redis.exists(keys.job_key(request_id)):  # finished meanwhile, or expired
                await self._redis.zrem(keys.deadlines(keys.cell_of(request_id)), request_id)
        return ended
