"""Where a job waits, and the Lua pieces the transitions that move it between lists share."""

from __future__ import annotations

from gputorrent import keys
from gputorrent.protocol import Job


def waiting_key(job: Job) -> str:
    """The list a queued job waits in: its model's shared queue or its worker's, in its priority band."""
    return keys.model_queue_key(job.model, job.priority) if job.shared else keys.queue_key(job.worker_id, job.priority)


def waiting_keys(job: Job) -> tuple[str, ...]:
    """Every band of the queue a job waits in (what a bound on that queue counts)."""
    return tuple(keys.model_queue_keys(job.model) if job.shared else keys.worker_queue_keys(job.worker_id))


def doorbell_key(job: Job) -> str:
    """The doorbell that wakes a consumer able to take the job."""
    return keys.model_doorbell_key(job.model) if job.shared else keys.worker_doorbell_key(job.worker_id)


# A job pushed onto a queue rings that queue's doorbell (keys `doorbell`, argument `doorbell_max`):
# one token per job, trimmed, so a consumer blocked in BLPOP on it wakes and takes. Tokens are hints,
# never jobs: a lost one costs a wait of at most the consumer's block timeout.
RING = """
redis.call('LPUSH', doorbell, '1')
redis.call('LTRIM', doorbell, 0, doorbell_max - 1)
"""

# Every transition that takes a job out of a list first removes it (key `held_in`, argument `raw`)
# and does nothing if that fails: whoever removes it owns it, so a job is never finished or moved
# twice. With `reaping` (a reaper acting on a dead holder) the holder's heartbeat (`holder_beat`)
# and `liveness:grace` (`grace`) must both be absent: the holder is still dead, and Redis has been
# in sight long enough for its absence to mean so.
HOLDER_DEAD = """
if reaping and redis.call('EXISTS', holder_beat, grace) > 0 then return 0 end
"""
GUARD = (
    HOLDER_DEAD
    + """
if redis.call('LREM', held_in, 1, raw) == 0 then return 0 end
"""
)


def guard_keys(dead: str | None) -> tuple[str, str]:
    """The `holder_beat` and `grace` keys of `HOLDER_DEAD`: for a reaper's move, the dead holder's
    heartbeat and `liveness:grace`. A worker's own call reads neither and names `heartbeat:` in their
    place, so its Redis user needs no access to `liveness:grace` (docs/security.md lists what it has)."""
    if dead is None:
        return keys.heartbeat_key(""), keys.heartbeat_key("")
    return keys.heartbeat_key(dead), keys.LIVENESS_GRACE
