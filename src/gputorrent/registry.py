"""The worker registry in Redis: register, heartbeat, leave, and the pool snapshot.

Liveness is the presence of `heartbeat:{worker_id}`: the worker rewrites it with a TTL on every
beat, so a worker that dies simply expires and every coordinator sees it at once.
"""

from __future__ import annotations

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gputorrent import keys
from gputorrent.protocol import Heartbeat, WorkerRecord, WorkerState


async def register(redis: Redis, record: WorkerRecord, heartbeat_ttl_s: float) -> None:
    """Store the record, add the id to `workers` and mark the worker alive, in one transaction.

    Registering the same id again replaces the record; concurrent registrations of one id
    end with exactly one record, never a half-written one.
    """
    heartbeat = Heartbeat(at=record.registered_at)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker_key(record.worker_id), record.model_dump_json())
        pipe.sadd(keys.WORKERS, record.worker_id)
        pipe.set(keys.heartbeat_key(record.worker_id), heartbeat.model_dump_json(), px=int(heartbeat_ttl_s * 1000))
        await pipe.execute()


def beat(client: SyncRedis, worker_id: str, heartbeat: Heartbeat, ttl_s: float) -> None:
    """Refresh the worker's liveness key with its load and condition (blocking: it runs on its own thread)."""
    client.set(keys.heartbeat_key(worker_id), heartbeat.model_dump_json(), px=int(ttl_s * 1000))


async def mark_gone(redis: Redis, worker_id: str) -> None:
    """Declare the worker dead now (it is shutting down) so no new job is routed to it."""
    await redis.delete(keys.heartbeat_key(worker_id))


# Only a worker with nothing left in its lists leaves the registry: the reaper finds jobs
# through the registry, so removing one that still holds jobs would lose them.
_DEREGISTER = """
if redis.call('LLEN', KEYS[1]) > 0 or redis.call('LLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[5], ARGV[1])
return 1
"""


async def deregister(redis: Redis, worker_id: str) -> bool:
    """Remove the worker from the pool if its queue and processing list are empty, else only mark it gone.

    Returns whether it left the registry.
    """
    left = await redis.eval(
        _DEREGISTER, 5,
        keys.queue_key(worker_id), keys.processing_key(worker_id), keys.worker_key(worker_id),
        keys.heartbeat_key(worker_id), keys.WORKERS, worker_id,
    )  # fmt: skip
    if not left:
        await mark_gone(redis, worker_id)
    return bool(left)


async def snapshot(redis: Redis) -> list[WorkerState]:
    """Every registered worker with its state, load and queue length, sorted by id."""
    worker_ids = sorted(str(worker_id) for worker_id in await redis.smembers(keys.WORKERS))
    if not worker_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in worker_ids:
            pipe.get(keys.worker_key(worker_id))
            pipe.get(keys.heartbeat_key(worker_id))
            pipe.llen(keys.queue_key(worker_id))
        replies = await pipe.execute()
    states = []
    for i, worker_id in enumerate(worker_ids):
        record_json, heartbeat_json, queue_length = replies[3 * i : 3 * i + 3]
        if record_json is None:
            continue
        record = WorkerRecord.model_validate_json(record_json)
        heartbeat = Heartbeat.model_validate_json(heartbeat_json) if heartbeat_json else None
        states.append(
            WorkerState(
                worker_id=worker_id,
                models=record.models,
                backend=record.backend,
                slots=record.slots,
                hardware=record.hardware,
                state=heartbeat.condition if heartbeat else "dead",
                state_reason=heartbeat.reason if heartbeat else None,
                jobs_in_flight=heartbeat.jobs_in_flight if heartbeat else 0,
                queue_length=queue_length,
                last_heartbeat_at=heartbeat.at if heartbeat else None,
                registered_at=record.registered_at,
            )
        )
    return states
