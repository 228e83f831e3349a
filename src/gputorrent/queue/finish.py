"""Finishing: a job taken out of the list that holds it and its result stored, in one script."""

from __future__ import annotations

from dataclasses import dataclass

from gputorrent import keys, replication
from gputorrent.protocol import JobResult
from gputorrent.queue.lists import FENCE, HOLDER_DEAD, MOVES_FIELD, NOTE_LENGTH, guard_keys
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script


@dataclass(frozen=True)
class FinishKeys:
    held_in: str  # the list that holds the job
    holder_beat: str  # see `lists.HOLDER_DEAD`
    grace: str
    result: str  # `result:{request_id}`
    status: str  # `job:{request_id}`
    stream: str  # `stream:{request_id}`
    deadlines: str
    lengths: str  # `keys.list_lengths()`


@dataclass(frozen=True)
class FinishArgs:
    reaping: bool
    fence: str  # the holder's lease fence ('' = not checked: see `lists.FENCE`)
    moves_field: str
    result_json: str
    ttl_s: int
    streamed: bool  # the stream ends with the result
    channel: str  # `keys.results_channel`
    publish: str  # PUBLISH, or SPUBLISH for a cell's shard channel (`keys.sharded_channels`)
    request_id: str
    announces_result: bool  # the announcement carries the result (see `announces_result`)


# A repeat of this very store (its WAIT came short, or its reply was lost) finds the entry gone and
# the result there: it touches the result, a write, so the WAIT sent with this call covers the first.
_FINISH = Script(
    FinishKeys,
    FinishArgs,
    NOTE_LENGTH
    + HOLDER_DEAD
    + FENCE
    + """
if redis.call('LREM', held_in, 1, request_id) == 0 then
  if redis.call('GET', result) == result_json then
    redis.call('EXPIRE', result, ttl_s)
    return 1
  end
  return 0
end
note_length(held_in)
redis.call('SET', result, result_json, 'EX', ttl_s)
redis.call('DEL', status)
redis.call('ZREM', deadlines, request_id)
if streamed then
  redis.call('XADD', stream, '*', 'result', result_json)
  redis.call('EXPIRE', stream, ttl_s)
end
if announces_result then
  redis.call(publish, channel, request_id .. '\\n' .. result_json)
else
  redis.call(publish, channel, request_id)
end
return 1
""",
)


async def finish(
    redis: RedisClient,
    held_in: str,
    result: JobResult,
    ttl_s: int,
    *,
    streamed: bool,
    fence: str = "",
    dead: str | None = None,
) -> bool:
    """Remove the job of `result` from the list `held_in` and store the result, atomically; False
    (nothing written) when the job is no longer there (the lease was lost), or, for a reaper acting on `dead`, when its
    heartbeat is back or `liveness:grace` holds, or, with the holder's lease `fence`, when the job moved
    on since it was taken (`Lease.fence`). A repeat that finds this very result stored already
    is True (and its `WAIT` covers the first store).

    Writes `result:{request_id}` with its TTL, drops the status record and the deadline, ends
    `stream:{request_id}` with the result for a streamed job, and announces it on the results channel
    (with the result itself where `announces_result`). Returns once the replicas the client wants
    have it.

    Raises:
        replication.Unreplicated: they did not within the bound; the result is stored on the primary,
            unacknowledged: call again with the same result.
    """
    request_id = result.request_id
    result_json = result.model_dump_json()
    cell = keys.cell_of(request_id)
    holder_beat, grace = guard_keys(dead, cell)
    finish_keys = FinishKeys(
        held_in=held_in, holder_beat=holder_beat, grace=grace, result=keys.result_key(request_id),
        status=keys.job_key(request_id), stream=keys.stream_key(request_id), deadlines=keys.deadlines(cell),
        lengths=keys.list_lengths(cell),
    )  # fmt: skip
    finish_args = FinishArgs(
        reaping=dead is not None, fence=fence, moves_field=MOVES_FIELD, result_json=result_json, ttl_s=ttl_s,
        streamed=streamed, channel=keys.results_channel(cell), request_id=request_id,
        publish="SPUBLISH" if keys.sharded_channels() else "PUBLISH",
        announces_result=announces_result(result_json, streamed=streamed),
    )  # fmt: skip
    return bool(await replication.run(redis, "result", request_id, _FINISH, finish_keys, finish_args))


# A result up to this size travels in its announcement, so a waiting request needs no read of Redis;
# a larger one (an embedding batch) is announced by its id alone, and read by whoever waits for it.
ANNOUNCED_RESULT_MAX_BYTES = 64 * 1024


def announces_result(result_json: str, *, streamed: bool) -> bool:
    """Whether `results:ready` carries the result itself (`{request_id}\\n{result JSON}`) or only its id.

    A streamed job's followers read its result from its stream, so its announcement is the id alone.
    """
    return not streamed and len(result_json) <= ANNOUNCED_RESULT_MAX_BYTES


def read_announcement(message: str) -> tuple[str, str | None]:
    """A `results:ready` message as (request id, the result's JSON or None when not carried)."""
    request_id, _, result_json = message.partition("\n")
    return request_id, result_json or None
