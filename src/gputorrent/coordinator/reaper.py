"""Hands the jobs of dead workers to live ones, and ends jobs past their deadline. Every coordinator
runs one; they need no coordination.

A worker is dead once its heartbeat key has expired. Its queued jobs move to a live worker
serving the model; the jobs it held (its processing list) move too, with their attempt
counted, and past `max_attempts` they fail with code `worker_lost`, so one job that kills
every worker it touches cannot take the pool down. Each move is one Lua script that first
removes the job from the dead worker's list, so two reapers never move a job twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent import handoff, keys, pool_stats, queue, registry
from gputorrent.protocol import ErrorInfo
from gputorrent.telemetry import FailureRecord

log = logging.getLogger(__name__)

OVERDUE_BATCH = 256  # deadlines handled per round; the rest wait for the next round
DEADLINE_PASSED = ErrorInfo(code="timeout", message="the request passed its deadline (timeout_s) before it finished")


class Reaper:
    """Runs `reap_once()` every `interval_s` until `stop()`."""

    def __init__(self, redis: Redis, interval_s: float, max_attempts: int, result_ttl_s: int) -> None:
        self._redis = redis
        self._interval_s = interval_s
        self._max_attempts = max_attempts
        self._result_ttl_s = result_ttl_s
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.reap_once()
                await self.end_overdue()
            except (RedisError, OSError) as e:
                log.warning("reaper cannot reach Redis (%s)", e)
            except Exception:  # the outermost boundary of a background duty: log, keep going
                log.exception("reaper round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def reap_once(self) -> int:
        """Move (or fail) every job of every dead worker once; returns how many were handled."""
        workers = await registry.snapshot(self._redis)
        handled = 0
        for dead in (w for w in workers if w.state == "dead"):
            # Queued jobs first, then the started ones: each move goes to the front of its new queue,
            # so the jobs that were already running are the next to run again, not the last.
            lists = [(False, queued_in) for queued_in in keys.worker_queue_keys(dead.worker_id)]
            lists += [(True, keys.processing_key(dead.worker_id))]
            for started, source in lists:
                handled += await handoff.hand_on(
                    self._redis, dead.worker_id, source, workers, count_attempt=started,
                    max_attempts=self._max_attempts, ttl_s=self._result_ttl_s, only_if_dead=True,
                )  # fmt: skip
        return handled

    async def end_overdue(self) -> int:
        """End every job past its deadline as failed with code `timeout`; returns how many were ended.

        The worker of a running job also stops at its own deadline check; whichever acts first
        writes the one result.
        """
        overdue = await self._redis.zrangebyscore(keys.DEADLINES, "-inf", time.time(), start=0, num=OVERDUE_BATCH)
        ended = 0
        for request_id in map(str, overdue):
            if (result := await queue.end(self._redis, request_id, DEADLINE_PASSED, self._result_ttl_s)) is not None:
                ended += 1
                await pool_stats.record_failure(self._redis, FailureRecord(
                    at=time.time(), request_id=request_id, model=result.model, worker_id=result.worker_id,
                    code=DEADLINE_PASSED.code, message=DEADLINE_PASSED.message,
                ))  # fmt: skip
            elif not await self._redis.exists(keys.job_key(request_id)):  # finished meanwhile, or expired
                await self._redis.zrem(keys.DEADLINES, request_id)
        return ended
