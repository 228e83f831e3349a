"""Moving a job its holder never finished back to a queue, or failing it after too many tries."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from gputorrent import keys, pool_stats
from gputorrent.protocol import ErrorInfo, Job, JobResult
from gputorrent.queue.finish import finish
from gputorrent.queue.lists import GUARD, RING, doorbell_key, guard_keys, waiting_key
from gputorrent.scripts import Script
from gputorrent.telemetry import FailureRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoveKeys:
    held_in: str  # the list the job leaves
    holder_beat: str  # see `lists.HOLDER_DEAD`
    grace: str
    waiting: str  # the list it joins, at the front
    status: str  # `job:{request_id}`
    doorbell: str  # `waiting`'s doorbell


@dataclass(frozen=True)
class MoveArgs:
    reaping: bool
    raw: str  # the job's entry in `held_in`
    job: str  # its JSON as it joins `waiting`
    worker_id: str  # the worker whose queue it joins ('' for a shared queue)
    doorbell_max: int


_MOVE = Script(
    MoveKeys,
    MoveArgs,
    GUARD
    + """
redis.call('RPUSH', waiting, job)
if redis.call('EXISTS', status) == 1 then
  redis.call('HSET', status, 'status', 'queued', 'worker_id', worker_id)
end
"""
    + RING
    + """
return 1
""",
)


async def requeue(redis: Redis, source_key: str, raw: str, job: Job, *, dead: str | None = None) -> bool:
    """Move `raw` from `source_key` to the front of the queue `job` waits in (its worker's, or for a
    shared job its model's) as `job`; False when `raw` is no longer there, or when `dead`'s heartbeat
    is back (it beat again, or re-registered) or `liveness:grace` holds."""
    holder_beat, grace = guard_keys(dead)
    move_keys = MoveKeys(
        held_in=source_key, holder_beat=holder_beat, grace=grace, waiting=waiting_key(job),
        status=keys.job_key(job.request_id), doorbell=doorbell_key(job),
    )  # fmt: skip
    move_args = MoveArgs(
        reaping=dead is not None, raw=raw, job=job.model_dump_json(), worker_id=job.worker_id,
        doorbell_max=keys.DOORBELL_MAX,
    )  # fmt: skip
    return bool(await _MOVE.run(redis, move_keys, move_args))


async def retry_or_fail(
    redis: Redis,
    source_key: str,
    raw: str,
    *,
    started: bool,
    target: str | None,
    max_attempts: int,
    ttl_s: int,
    dead: str | None = None,
) -> bool:
    """Give a job its holder never finished another try on `target`, or fail it with `worker_lost`.

    A job that had started counts an attempt (one still queued does not); past `max_attempts` it
    fails, so a job that kills every worker it touches cannot take the pool down. A shared job
    goes back to its model's shared queue whatever `target` is. With no `target` (nobody serves
    the model now) any other job stays where it is. With `dead` (a reaper's move) nothing happens
    once that worker's heartbeat is back, or while `liveness:grace` holds. A job whose entry cannot
    be read is dropped with an error log. Returns whether the job was moved or failed.
    """
    try:
        job = Job.model_validate_json(raw)
    except ValueError:
        log.error("dropping an unreadable job from %s: %.200s", source_key, raw)
        return bool(await redis.lrem(source_key, 1, raw))
    attempt = job.attempt + 1 if started else job.attempt
    if attempt > max_attempts:
        message = f"the job's worker stopped before finishing it, {job.attempt} times; giving up"
        failed = JobResult(
            request_id=job.request_id, status="failed", model=job.model, worker_id=job.worker_id,
            error=ErrorInfo(code="worker_lost", message=message),
        )  # fmt: skip
        if not await finish(redis, source_key, raw, failed, ttl_s, streamed=job.stream, dead=dead):
            return False
        # No worker finished it, so no worker reports it: the pool's failure list hears it here.
        await pool_stats.record_failure(redis, FailureRecord(
            at=time.time(), request_id=job.request_id, model=job.model, worker_id=job.worker_id or "",
            code="worker_lost", message=message,
        ))  # fmt: skip
        return True
    if target is None and not job.shared:
        return False
    worker_id = "" if job.shared else target
    moved = job.model_copy(update={"worker_id": worker_id, "attempt": attempt, "enqueued_at": time.time()})
    return await requeue(redis, source_key, raw, moved, dead=dead)
