"""Hands the jobs of dead workers to live ones. Every coordinator runs one; they need no coordination.

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

from gputorrent import keys, queue, registry, routing
from gputorrent.protocol import ErrorInfo, Job, JobResult, WorkerState
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)


def next_attempt(job: Job, started: bool) -> int:
    """A job a worker had started counts as an attempt; one still queued does not.

    >>> job = Job(request_id="r", worker_id="w", model="m", enqueued_at=0.0)
    >>> next_attempt(job, started=True), next_attempt(job, started=False)
    (2, 1)
    """
    return job.attempt + 1 if started else job.attempt


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
        backoff = Backoff(first_s=self._interval_s, max_s=max(5.0, self._interval_s))
        while not self._stopping.is_set():
            try:
                await self.reap_once()
                backoff.reset()
            except (RedisError, OSError) as e:
                log.warning("reaper cannot reach Redis (%s)", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.delay_s)

    async def reap_once(self) -> int:
        """Move (or fail) every job of every dead worker once; returns how many were handled."""
        workers = await registry.snapshot(self._redis)
        handled = 0
        for dead in (w for w in workers if w.state == "dead"):
            for started, source in ((True, keys.processing_key), (False, keys.queue_key)):
                for raw in await self._redis.lrange(source(dead.worker_id), 0, -1):
                    handled += await self._rehome(dead.worker_id, source(dead.worker_id), str(raw), started, workers)
        return handled

    async def _rehome(self, dead_id: str, source: str, raw: str, started: bool, workers: list[WorkerState]) -> int:
        job = Job.model_validate_json(raw)
        attempt = next_attempt(job, started)
        if attempt > self._max_attempts:
            message = f"the job's worker stopped answering on {job.attempt} attempts; giving up"
            result = JobResult(
                request_id=job.request_id,
                status="failed",
                model=job.model,
                worker_id=dead_id,
                error=ErrorInfo(code="worker_lost", message=message),
            )
            failed = await queue.finish(self._redis, dead_id, raw, result, self._result_ttl_s, streamed=job.stream)
            if failed:
                log.warning("request %s failed: worker %s lost it on attempt %d", job.request_id, dead_id, job.attempt)
            return int(failed)
        candidates = routing.candidates_for(job.model, workers)
        if not candidates:
            return 0  # nobody serves the model now; the next round tries again
        target = routing.pick_round_robin(candidates, await queue.next_round_robin(self._redis))
        moved = job.model_copy(update={"worker_id": target, "attempt": attempt, "enqueued_at": time.time()})
        if await queue.requeue(self._redis, source, raw, moved):
            log.info(
                "request %s moved from dead worker %s to %s (attempt %d)", job.request_id, dead_id, target, attempt
            )
            return 1
        return 0
