"""Where a queued job stands: how many jobs will be taken before it, and about when it starts."""

from __future__ import annotations

from redis.asyncio import Redis

from gputorrent import keys, pool_stats, registry
from gputorrent.protocol import JobStatus

HISTORY_S = 60  # the span of recent jobs the start estimate learns from


async def place_in_queue(redis: Redis, status: JobStatus) -> JobStatus:
    """`status` with `position` (jobs that will be taken before it) and `eta_s` (seconds until it
    starts, from the pool's recent job times and the slots that serve it), when it is queued."""
    if status.status != "queued":
        return status
    record = await redis.hgetall(keys.job_key(status.request_id))
    priority = int(record.get("priority", keys.PRIORITY_DEFAULT))
    worker_id = status.worker_id
    bands = keys.worker_queue_keys(worker_id) if worker_id else keys.model_queue_keys(status.model)
    ahead = 0
    for band, key in zip(keys.PRIORITY_BANDS, bands, strict=True):
        if band > priority:
            ahead += int(await redis.llen(key))
        elif band == priority:
            # Jobs are pushed on the left and taken from the right: those to its right go first.
            entries = [str(raw) for raw in await redis.lrange(key, 0, -1)]
            marker = f'"request_id":"{status.request_id}"'
            index = next((i for i, raw in enumerate(entries) if marker in raw), None)
            if index is None:
                return status  # taken or moved just now
            ahead += len(entries) - 1 - index
    return status.model_copy(update={"position": ahead, "eta_s": await _eta(redis, status, ahead)})


async def _eta(redis: Redis, status: JobStatus, ahead: int) -> float | None:
    recent = [p for p in await pool_stats.history(redis, HISTORY_S) if p.latency_avg_s is not None]
    if not recent:
        return None  # nothing finished lately to learn from
    service_s = sum((p.latency_avg_s or 0) - (p.queue_wait_avg_s or 0) for p in recent) / len(recent)
    workers = await registry.snapshot(redis)
    serving = [w for w in workers if w.state == "alive" and (w.worker_id == status.worker_id or not status.worker_id)]
    slots = sum(w.slots for w in serving if status.model in w.models) or 1
    return round(max(0.0, service_s) * ahead / slots, 3)
