"""Taking: a worker moves the next job it may run into its processing list (its lease), in one script."""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gputorrent import keys, pipelined
from gputorrent.protocol import ErrorInfo, Job, JobResult
from gputorrent.queue.finish import finish
from gputorrent.queue.move import retry_or_fail
from gputorrent.scripts import Script

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A job a worker has taken: it stays in `processing:{worker_id}` as `raw` until finished.

    `streamed_before`: its stream already had entries when it was taken (an earlier attempt
    streamed part of it), so the worker reads them to continue after them; a fresh job skips that read.
    `more_queued`: jobs were left in the queues it was taken from, so the next take looks at once
    rather than waiting for a doorbell first (see `pop`).
    """

    job: Job
    raw: str
    streamed_before: bool = False
    taken_at: float = 0.0  # unix time, seconds: when this worker took it (the end of its time queued)
    more_queued: bool = True


@dataclass(frozen=True)
class TakeKeys:
    processing: str  # `processing:{worker_id}`: where a taken job stays until finished
    doorbells: tuple[str, ...]  # the doorbells of `sources`
    sources: tuple[str, ...]  # the queues it takes from, highest priority first


@dataclass(frozen=True)
class TakeArgs:
    worker_id: str
    status_prefix: str  # `job:` and `stream:`: a job's keys are known only once it is taken
    stream_prefix: str


# Takes the first job of the first non-empty source into the processing list, marks it running with
# its taker in the job's status (so `end` finds it there), and answers {raw, whether its stream
# exists, whether any source still holds a job}. Finding nothing, it empties the doorbells: every
# token in them is stale, and a job queued after this script rings again. An idle worker runs it
# once per blocked wait, so an empty look is one EXISTS over every source, not a pop per source:
# with thousands of idle workers that is most of what they cost Redis (bench/scale.py). The job's
# request id is read from the front of its JSON (`request_id_of`; the model's first field). The time
# it was taken is Redis's own: the script may run long after its caller sent it (see `pop`).
_TAKE = Script(
    TakeKeys,
    TakeArgs,
    """
if redis.call('EXISTS', unpack(sources)) == 0 then
  for _, bell in ipairs(doorbells) do redis.call('DEL', bell) end
  return false
end
for i, source in ipairs(sources) do
  local raw = redis.call('RPOPLPUSH', source, processing)
  if raw then
    local request_id = string.match(raw, '"request_id":"([^"]*)"')
    local streamed = 0
    if request_id then
      local status = status_prefix .. request_id
      if redis.call('EXISTS', status) == 1 then
        local now = redis.call('TIME')
        local started_at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
        redis.call('HSET', status, 'status', 'running', 'worker_id', worker_id, 'started_at', started_at)
      end
      streamed = redis.call('EXISTS', stream_prefix .. request_id)
    end
    local more = 0
    for j = i, #sources do
      if redis.call('LLEN', sources[j]) > 0 then more = 1 break end
    end
    return {raw, streamed, more}
  end
end
for _, bell in ipairs(doorbells) do redis.call('DEL', bell) end
return false
""",
)


async def pop(
    redis: Redis,
    worker_id: str,
    timeout_s: float,
    models: Sequence[str] = (),
    *,
    result_ttl_s: int,
    wait_first: bool = False,
) -> Lease | None:
    """Move the oldest job of the highest priority band of the worker's queue, or of the shared
    queues of `models`, into its processing list; None when there is none within about `timeout_s`.

    The move is one script, so the job is never only in the worker's memory: if the worker dies,
    the reaper finds it there. With nothing to take, the consumer blocks on the doorbells of those
    queues (one token per job queued), then looks once more. `wait_first`: the caller's last take
    left the queues empty (or found nothing), so any job queued since has rung a doorbell, and the
    first look is skipped. An entry that is not a readable job is not returned: it fails, with
    `result_ttl_s` (see `held_job`).
    """
    doorbells, numkeys, take_args = _take_arguments(worker_id, tuple(models))
    taken = None if wait_first else await _TAKE.run_flat(redis, numkeys, take_args)
    while True:
        if taken is None:
            taken = await _wait_and_take(redis, doorbells, timeout_s, numkeys, take_args)
            if taken is None:
                return None
        raw, streamed_before, more_queued = str(taken[0]), bool(taken[1]), bool(taken[2])
        if (job := await held_job(redis, worker_id, raw, result_ttl_s)) is None:
            taken = await _TAKE.run_flat(redis, numkeys, take_args)
            continue
        job = job.model_copy(update={"worker_id": worker_id}) if job.shared else job
        return Lease(job=job, raw=raw, streamed_before=streamed_before, taken_at=time.time(), more_queued=more_queued)


@functools.lru_cache(maxsize=256)
def _take_arguments(worker_id: str, models: tuple[str, ...]) -> tuple[list[str], int, tuple[bytes, ...]]:
    """The doorbells, and the key count and arguments of `_TAKE`, for a worker serving `models`
    (the same on every take: built and encoded once)."""
    doorbells = [keys.worker_doorbell_key(worker_id), *(keys.model_doorbell_key(m) for m in models)]
    sources = [
        key
        for band in keys.PRIORITY_BANDS
        for key in (keys.queue_key(worker_id, band), *(keys.model_queue_key(m, band) for m in models))
    ]
    numkeys, arguments = _TAKE.call(
        TakeKeys(processing=keys.processing_key(worker_id), doorbells=tuple(doorbells), sources=tuple(sources)),
        TakeArgs(worker_id=worker_id, status_prefix=keys.job_key(""), stream_prefix=keys.stream_key("")),
    )
    return doorbells, numkeys, tuple(argument.encode() for argument in arguments)


async def _wait_and_take(
    redis: Redis, doorbells: list[str], timeout_s: float, numkeys: int, take: tuple[bytes, ...]
) -> Any:
    """Block on the doorbells for up to `timeout_s`, then run the take script, in one send: Redis runs
    the take on this connection as soon as the pop returns, with no round trip to the worker between
    them (a job's wake costs one reply, not two)."""
    async with pipelined.borrowed(redis) as connection:
        try:
            _, taken = await connection.execute_all(
                ("BLPOP", *doorbells, repr(timeout_s)),  # Redis 6+ takes fractional seconds
                ("EVALSHA", _TAKE.sha, numkeys, *take),
                blocks_s=timeout_s,
            )
        except NoScriptError:  # a new or restarted Redis: the pop ran, the take did not
            taken = await _TAKE.run_flat(redis, numkeys, take)
    return taken


# A job's JSON starts with its request id (the model's first field); ids never hold a quote.
_REQUEST_ID = re.compile(r'"request_id":"([^"]*)"')


def request_id_of(raw: str) -> str | None:
    """The request id of a job's JSON entry, without parsing the whole (maybe large) job.

    >>> request_id_of('{"request_id":"r-12345678","worker_id":"w1"}')
    'r-12345678'
    """
    match = _REQUEST_ID.search(raw, 0, 300)
    return match.group(1) if match else None


UNREADABLE_MESSAGE = (
    "worker {worker_id} could not read the job, which a coordinator newer than it may have queued "
    "(upgrade coordinators and workers together): {cause}"
)


async def held_job(redis: Redis, worker_id: str, raw: str, result_ttl_s: int) -> Job | None:
    """The job of `raw`, an entry of the worker's processing list; None for an entry that is not a
    readable job. That one fails at once with `unreadable_job` (its client learns why, rather than
    wait for its deadline), or is dropped where not even its request id can be read; either way
    with an error log, rather than crash the worker."""
    try:
        return Job.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        cause = f"{'.'.join(map(str, first['loc'])) or 'job'}: {first['msg']}"
    log.error("worker %s: cannot read a job (%s): %.200s", worker_id, cause, raw)
    held_in = keys.processing_key(worker_id)
    request_id = request_id_of(raw)
    if request_id is None:
        await redis.lrem(held_in, 1, raw)
        return None
    try:  # the fields a result needs, from whatever JSON is there
        fields = json.loads(raw)
    except ValueError:
        fields = {}
    fields = fields if isinstance(fields, dict) else {}
    model = fields.get("model")
    failed = JobResult(
        request_id=request_id, status="failed", model=model if isinstance(model, str) else "", worker_id=worker_id,
        error=ErrorInfo(code="unreadable_job", message=UNREADABLE_MESSAGE.format(worker_id=worker_id, cause=cause)),
    )  # fmt: skip
    try:
        await finish(redis, held_in, raw, failed, result_ttl_s, streamed=fields.get("stream") is True)
    except ValueError:  # not even a result can be written from what is there (text that is not UTF-8)
        await redis.lrem(held_in, 1, raw)
    return None


async def recover(redis: Redis, worker_id: str, max_attempts: int, ttl_s: int) -> int:
    """Give the jobs a previous run of this worker left in `processing:{worker_id}` another try here.

    They count an attempt, as the reaper counts them: a job that crashes its worker every time
    fails with `worker_lost` instead of looping through restarts.
    """
    held_in = keys.processing_key(worker_id)
    handled = 0
    # Newest first: each goes to the front of the queue, so the oldest ends up taken first again.
    for raw in await redis.lrange(held_in, 0, -1):
        handled += await retry_or_fail(
            redis, held_in, str(raw), started=True, target=worker_id, max_attempts=max_attempts, ttl_s=ttl_s
        )
    return handled
