"""Moving a job its holder never finished back to a queue, or failing it after too many tries."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gputorrent import keys, pool_stats
from gputorrent.protocol import ErrorInfo, Job, JobResult
from gputorrent.queue.finish import finish
from gputorrent.queue.lists import (
    FENCE,
    GUARD_LIST,
    HOLDER_DEAD,
    JOB_FIELD,
    MOVES_FIELD,
    NOTE_LENGTH,
    RING,
    doorbell_key,
    guard_keys,
    waiting_key,
)
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script
from gputorrent.telemetry import FailureRecord


@dataclass(frozen=True)
class MoveKeys:
    held_in: str  # the list the job leaves
    holder_beat: str  # see `lists.HOLDER_DEAD`
    grace: str
    waiting: str  # the list it joins, at the front
    status: str  # `job:{request_id}`
    doorbell: str  # `waiting`'s doorbell
    lengths: str  # `keys.list_lengths()`


@dataclass(frozen=True)
class MoveArgs:
    reaping: bool
    fence: str  # the holder's lease fence ('' = not checked: see `lists.FENCE`)
    request_id: str
    job: str  # its JSON as it joins `waiting`
    job_field: str
    moves_field: str
    worker_id: str  # the worker whose queue it joins ('' for a shared queue)
    doorbell_max: int


_MOVE = Script(
    MoveKeys,
    MoveArgs,
    NOTE_LENGTH
    + HOLDER_DEAD
    + FENCE
    + """
-- A job whose status record is gone (expired: long past its deadline) has nothing left to run.
if redis.call('EXISTS', status) == 0 then
  redis.call('LREM', held_in, 1, request_id)
  note_length(held_in)
  return 0
end
"""
    + GUARD_LIST
    + """
redis.call('RPUSH', waiting, request_id)
note_length(held_in)
note_length(waiting)
redis.call('HSET', status, 'status', 'queued', 'worker_id', worker_id, job_field, job)
redis.call('HINCRBY', status, moves_field, 1)
"""
    + RING
    + """
return 1
""",
)


async def requeue(redis: RedisClient, source_key: str, job: Job, *, fence: str = "", dead: str | None = None) -> bool:
    """Move the job from `source_key` to the front of the queue `job` waits in (its worker's, or for a
    shared job its model's), its record now `job`; False when it is no longer there (or its record is
    gone), or when `dead`'s heartbeat is back (it beat again, or re-registered) or `liveness:grace` holds,
    or, with the holder's lease `fence`, when the job moved on since it was taken."""
    cell = keys.cell_of(job.request_id)  # the job's every key, and the lists it moves between
    holder_beat, grace = guard_keys(dead, cell)
    move_keys = MoveKeys(
        held_in=source_key, holder_beat=holder_beat, grace=grace, waiting=waiting_key(job),
        status=keys.job_key(job.request_id), doorbell=doorbell_key(job), lengths=keys.list_lengths(cell),
    )  # fmt: skip
    move_args = MoveArgs(
        reaping=dead is not None, fence=fence, request_id=job.request_id, job=job.model_dump_json(),
        job_field=JOB_FIELD, moves_field=MOVES_FIELD,
        worker_id=job.worker_id, doorbell_max=keys.DOORBELL_MAX,
    )  # fmt: skip
    return bool(await _MOVE.run(redis, move_keys, move_args))


async def retry_or_fail(
    redis: RedisClient,
    source_key: str,
    job: Job,
    *,
    started: bool,
    target: str | None,
    max_attempts: int,
    ttl_s: int,
    fence: str = "",
    dead: str | None = None,
) -> bool:
    """Give a job its holder never finished another try on `target`, or fail it with `worker_lost`.

    A job that had started counts an attempt (one still queued does not); past `max_attempts` it
    fails, so a job that kills every worker it touches cannot take the pool down. A shared job
    goes back to its model's shared queue whatever `target` is. With no `target` (nobody serves
    the model now) any other job stays where it is. With `dead` (a reaper's move) nothing happens
    once that worker's heartbeat is back, or while `liveness:grace` holds; with a holder's lease
    `fence`, nothing happens once the job moved on since it was taken. Returns whether the job was
    moved or failed.
    """
    attempt = job.attempt + 1 if started else job.attempt
    if attempt > max_attempts:
        message = f"the job's worker stopped before finishing it, {job.attempt} times; giving up"
        failed = JobResult(
            request_id=job.request_id, status="failed", model=job.model, worker_id=job.worker_id,
            error=ErrorInfo(code="worker_lost", message=message),
        )  # fmt: skip
        if not await finish(redis, source_key, failed, ttl_s, streamed=job.stream, fence=fence, dead=dead):
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
    return await requeue(redis, source_key, moved, fence=fence, dead=dead)
