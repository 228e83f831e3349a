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

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent import keys, queue, registry, routing
from gputorrent.protocol import Job, WorkerState

log = logging.getLogger(__name__)


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
            for started, source in (
                (True, keys.processing_key(dead.worker_id)),
                (False, keys.queue_key(dead.worker_id)),
            ):
                for raw in await self._redis.lrange(source, 0, -1):
                    handled += await self._rehome(dead.worker_id, source, str(raw), started, workers)
        return handled

    async def _rehome(self, dead_id: str, source: str, raw: str, started: bool, workers: list[WorkerState]) -> int:
        model = _model_of(raw)
        candidates = routing.candidates_for(model, workers) if model else []
        target = routing.pick_round_robin(candidates, await queue.next_round_robin(self._redis)) if candidates else None
        handled = await queue.retry_or_fail(
            self._redis, source, raw, started=started, target=target,
            max_attempts=self._max_attempts, ttl_s=self._result_ttl_s, dead=dead_id,
        )  # fmt: skip
        if handled:
            log.info("a job of dead worker %s was handed to %s", dead_id, target or "nobody: it failed")
        return int(handled)


def _model_of(raw: str) -> str | None:
    try:
        return Job.model_validate_json(raw).model
    except ValueError:
        return None  # retry_or_fail drops it
