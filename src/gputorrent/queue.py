"""Job queue operations, shared by coordinator and worker.

A request is findable in Redis from admission to result: `job:{request_id}` holds its status
while it is queued or running, and `result:{request_id}` holds the result after; the switch
from one to the other is a single transaction.
"""

from __future__ import annotations

import time

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


async def pop(redis: Redis, worker_id: str, timeout_s: float) -> Job | None:
    """Take the oldest job of the worker's queue (BRPOP), or None after `timeout_s`."""
    reply = await redis.brpop([keys.queue_key(worker_id)], timeout=timeout_s)
    if reply is None:
        return None
    return Job.model_validate_json(reply[1])


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


async def store_result(redis: Redis, result: JobResult, ttl_s: int, *, streamed: bool = False) -> None:
    """Write `result:{request_id}` with its TTL, drop the status record, and announce it, atomically.

    For a streamed job the same transaction ends `stream:{request_id}` with the result, so a
    follower never sees a result that the stream lacks or the other way round.
    """
    result_json = result.model_dump_json()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.result_key(result.request_id), result_json, ex=ttl_s)
        pipe.delete(keys.job_key(result.request_id))
        if streamed:
            pipe.xadd(keys.stream_key(result.request_id), {"result": result_json})
            pipe.expire(keys.stream_key(result.request_id), ttl_s)
        pipe.publish(keys.RESULTS_CHANNEL, result.request_id)
        await pipe.execute()


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
