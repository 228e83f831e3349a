"""Where a job waits, and the Lua pieces the transitions that move it between lists share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gputorrent import keys
from gputorrent.protocol import Job
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script

# A queue, and a worker's processing list, hold request ids; the job itself (its JSON) is this field
# of its status record `job:{request_id}`, written at admission and rewritten when the job moves.
JOB_FIELD = "job"
# How many times the job was moved to a queue since admission: a lease's fence. A worker's finish or
# move names the count it took the job at, and is refused once the job has moved on since (even to
# the same worker again, as a shared job can be), as its entry's text once made it.
MOVES_FIELD = "moves"
FENCE = """
if fence ~= '' then
  local moves = redis.call('HGET', status, moves_field)
  if moves and moves ~= fence then return 0 end
end
"""


async def bodies(redis: RedisClient, request_ids: Sequence[str]) -> list[str | None]:
    """The JSON of each job (None where its status record is gone), in one round trip."""
    if not request_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in request_ids:
            pipe.hget(keys.job_key(request_id), JOB_FIELD)
        return [None if body is None else str(body) for body in await pipe.execute()]


def waiting_key(job: Job) -> str:
    """The list a queued job waits in: its model's shared queue (in the job's cell) or its worker's, in
    its priority band."""
    if job.shared:
        return keys.model_queue_key(job.model, job.priority, cell=keys.cell_of(job.request_id))
    return keys.queue_key(job.worker_id, job.priority)


def waiting_keys(job: Job) -> tuple[str, ...]:
    """Every band of the queue a job waits in (what a bound on that queue counts)."""
    if job.shared:
        return tuple(keys.model_queue_keys(job.model, cell=keys.cell_of(job.request_id)))
    return tuple(keys.worker_queue_keys(job.worker_id))


def doorbell_key(job: Job) -> str:
    """The doorbell that wakes a consumer able to take the job."""
    if job.shared:
        return keys.model_doorbell_key(job.model, cell=keys.cell_of(job.request_id))
    return keys.worker_doorbell_key(job.worker_id)


# Every script that pushes onto a queue or a processing list, or takes from one, then calls
# `note_length(list)` (key `lengths`, `keys.list_lengths()`): it writes the list's true length there,
# not a count up or down, so a list changed some other way (by hand) is right again at its next move.
NOTE_LENGTH = """
local function note_length(list)
  local length = redis.call('LLEN', list)
  if length > 0 then redis.call('HSET', lengths, list, length) else redis.call('HDEL', lengths, list) end
end
"""


@dataclass(frozen=True)
class _ForgetKeys:
    held_in: str
    lengths: str


@dataclass(frozen=True)
class _ForgetArgs:
    request_id: str


_FORGET = Script(
    _ForgetKeys,
    _ForgetArgs,
    NOTE_LENGTH
    + """
local removed = redis.call('LREM', held_in, 1, request_id)
note_length(held_in)
return removed
""",
)


async def forget(redis: RedisClient, held_in: str, request_id: str) -> bool:
    """Drop the id from the list `held_in` (a job that cannot run: its record is gone or unreadable)
    without a result; whether it was there."""
    lengths = keys.list_lengths(keys.cell_of(request_id))  # `held_in` is a list of the request's cell
    return bool(
        await _FORGET.run(redis, _ForgetKeys(held_in=held_in, lengths=lengths), _ForgetArgs(request_id=request_id))
    )


# A job pushed onto a queue rings that queue's doorbell (keys `doorbell`, argument `doorbell_max`):
# one token per job, trimmed, so a consumer blocked in BLPOP on it wakes and takes. Tokens are hints,
# never jobs: a lost one costs a wait of at most the consumer's block timeout.
RING = """
redis.call('LPUSH', doorbell, '1')
redis.call('LTRIM', doorbell, 0, doorbell_max - 1)
"""

# Every transition that takes a job out of a list first removes it (key `held_in`, argument `request_id`)
# and does nothing if that fails: whoever removes it owns it, so a job is never finished or moved
# twice. With `reaping` (a reaper acting on a dead holder) the holder's heartbeat (`holder_beat`)
# and `liveness:grace` (`grace`) must both be absent: the holder is still dead, and Redis has been
# in sight long enough for its absence to mean so.
HOLDER_DEAD = """
if reaping and redis.call('EXISTS', holder_beat, grace) > 0 then return 0 end
"""
GUARD_LIST = """
if redis.call('LREM', held_in, 1, request_id) == 0 then return 0 end
"""


def guard_keys(dead: str | None, cell: int) -> tuple[str, str]:
    """The `holder_beat` and `grace` keys of `HOLDER_DEAD` in the job's `cell`: for a reaper's move, the
    dead holder's heartbeat there and the cell's `liveness:grace`. A worker's own call reads neither and
    names `heartbeat:` in their place, so its Redis user needs no access to `liveness:grace`
    (docs/security.md lists what it has)."""
    if dead is None:
        return keys.heartbeat_key("", cell), keys.heartbeat_key("", cell)
    return keys.heartbeat_key(dead, cell), keys.liveness_grace(cell)
