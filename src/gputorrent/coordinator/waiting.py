"""Where a queued job stands: how many jobs will be taken before it, and about when it starts."""

from __future__ import annotations

from dataclasses import dataclass

from gputorrent import keys, pool_stats
from gputorrent.coordinator.snapshot import current_pool
from gputorrent.protocol import JobStatus
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script

HISTORY_S = 60  # the span of recent jobs the start estimate learns from


@dataclass(frozen=True)
class _AheadKeys:
    higher: tuple[str, ...]  # the bands taken before the job's own
    band: str  # the job's own band


@dataclass(frozen=True)
class _AheadArgs:
    request_id: str


# How many jobs will be taken before one: every job in the higher bands, and those to its right in
# its own band (pushed on the left, taken from the right); -1 when it is not there (taken or moved
# just now). Counted in Redis, in one step.
_AHEAD = Script(
    _AheadKeys,
    _AheadArgs,
    """
local at = redis.call('LPOS', band, request_id)
if not at then return -1 end
local ahead = redis.call('LLEN', band) - 1 - at
for _, higher_band in ipairs(higher) do ahead = ahead + redis.call('LLEN', higher_band) end
return ahead
""",
)


async def place_in_queue(redis: RedisClient, status: JobStatus) -> JobStatus:
    """`status` with `position` (jobs that will be taken before it) and `eta_s` (seconds until it
    starts, from the pool's recent job times and the slots that serve it), when it is queued."""
    if status.status != "queued":
        return status
    priority = int(await redis.hget(keys.job_key(status.request_id), "priority") or keys.PRIORITY_DEFAULT)
    worker_id = status.worker_id
    if worker_id:
        bands = keys.worker_queue_keys(worker_id)
    else:
        bands = keys.model_queue_keys(status.model, cell=keys.cell_of(status.request_id))
    own = keys.PRIORITY_BANDS.index(priority)
    where = _AheadKeys(higher=tuple(bands[:own]), band=bands[own])
    ahead = int(await _AHEAD.run(redis, where, _AheadArgs(request_id=status.request_id)))
    if ahead < 0:
        return status  # taken or moved just now
    return status.model_copy(update={"position": ahead, "eta_s": await _eta(redis, status, ahead)})


async def _eta(redis: RedisClient, status: JobStatus, ahead: int) -> float | None:
    recent = [p for p in await pool_stats.history(redis, HISTORY_S) if p.latency_avg_s is not None]
    if not recent:
        return None  # nothing finished lately to learn from
    service_s = sum((p.latency_avg_s or 0) - (p.queue_wait_avg_s or 0) for p in recent) / len(recent)
    workers = await current_pool(redis)
    serving = [w for w in workers if w.state == "alive" and (w.worker_id == status.worker_id or not status.worker_id)]
    slots = sum(w.slots for w in serving if status.model in w.models) or 1
    return round(max(0.0, service_s) * ahead / slots, 3)
