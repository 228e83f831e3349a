"""Job queue operations, shared by coordinator and worker.

A request is findable in Redis from admission to result: `job:{request_id}` holds its status
while it is queued or running, and `result:{request_id}` holds the result after; the switch
from one to the other is a single transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from gputorrent import keys
from gputorrent.protocol import Job, JobResult, JobStatus


async def next_round_robin(redis: Redis) -> int:
    """Advance the seed's `worker_index` counter; the caller takes it modulo the candidates."""
    return int(await redis.incr(keys.WORKER_INDEX))


async def enqueue(redis: Redis, job: Job, ttl_s: int) -> None:
    """Record the job as queued and push it onto `queue:{worker_id}`, atomically."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            keys.job_key(job.request_id),
            mapping={"status": "queued", "worker_id": job.worker_id, "model": job.model},
        )
        pipe.expire(keys.job_key(job.request_id), ttl_s)
        pipe.lpush(keys.queue_key(job.worker_id), job.model_dump_json())
        await pipe.execute()


@dataclass(frozen=True)
class Lease:
    """A job a worker has taken: it stays in `processing:{worker_id}` as `raw` until finished."""

    job: Job
    raw: str


async def pop(redis: Redis, worker_id: str, timeout_s: float) -> Lease | None:
    """Move the oldest job of the worker's queue into its processing list (BLMOVE); None after `timeout_s`.

    The job is never only in the worker's memory: if the worker dies, the reaper finds it there.
    """
    source, target = keys.queue_key(worker_id), keys.processing_key(worker_id)
    # Redis 6+ takes fractional seconds; redis-py's annotation says int.
    raw = await redis.blmove(source, target, timeout_s, "RIGHT", "LEFT")  # type: ignore[arg-type]
    if raw is None:
        return None
    return Lease(job=Job.model_validate_json(raw), raw=str(raw))


async def recover(redis: Redis, worker_id: str) -> int:
    """Put the jobs a previous run of this worker left in `processing:{worker_id}` back at the front of its queue."""
    moved = 0
    while await redis.lmove(keys.processing_key(worker_id), keys.queue_key(worker_id), "LEFT", "RIGHT"):
        moved += 1
    return moved


# HSET on a missing key would create a status record without its TTL; only update a live one.
_MARK_RUNNING = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
end
return -1
"""


async def mark_running(redis: Redis, request_id: str) -> None:
    """Note that a worker started the job, if its status record still exists."""
    await redis.eval(_MARK_RUNNING, 1, keys.job_key(request_id), str(time.time()))


# Finishing is conditional on still holding the lease: a worker whose job was handed to
# another (it was judged dead) must not write a second result.
_FINISH = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[3])
if ARGV[4] == '1' then
  redis.call('XADD', KEYS[4], '*', 'result', ARGV[2])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""


async def finish(redis: Redis, holder: str, raw: str, result: JobResult, ttl_s: int, *, streamed: bool) -> bool:
    """Release the lease and store the result, atomically; False (nothing written) if the lease was lost.

    `holder` is the worker whose processing list holds `raw`. Writes `result:{request_id}` with its
    TTL, drops the status record, ends `stream:{request_id}` with the result for a streamed job,
    and announces the id on the results channel.
    """
    request_id = result.request_id
    finished = await redis.eval(
        _FINISH,
        4,
        keys.processing_key(holder),
        keys.result_key(request_id),
        keys.job_key(request_id),
        keys.stream_key(request_id),
        raw,
        result.model_dump_json(),
        str(ttl_s),
        "1" if streamed else "0",
        keys.RESULTS_CHANNEL,
        request_id,
    )
    return bool(finished)


_REQUEUE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'status', 'queued', 'worker_id', ARGV[3])
end
return 1
"""


async def requeue(redis: Redis, source_key: str, raw: str, job: Job) -> bool:
    """Move a job from `source_key` (a dead worker's list) to the front of `job.worker_id`'s queue.

    Atomic and exactly-once across coordinators: only the caller that removes `raw` re-queues it.
    """
    moved = await redis.eval(
        _REQUEUE, 3, source_key, keys.queue_key(job.worker_id), keys.job_key(job.request_id),
        raw, job.model_dump_json(), job.worker_id,
    )  # fmt: skip
    return bool(moved)


async def lookup(redis: Redis, request_id: str) -> JobResult | JobStatus | None:
    """The result if it exists, else the job's status, else None (unknown id), read atomically."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(keys.result_key(request_id))
        pipe.hgetall(keys.job_key(request_id))
        result_json, status = await pipe.execute()
    if result_json is not None:
        return JobResult.model_validate_json(result_json)
    if status:
        return JobStatus(
            request_id=request_id, status=status["status"], worker_id=status["worker_id"], model=status["model"]
        )
    return None
