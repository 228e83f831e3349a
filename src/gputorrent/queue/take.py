"""Taking: a worker moves the next job it may run into its processing list (its lease), in one script."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.exceptions import NoScriptError

from gputorrent import keys, pipelined
from gputorrent.protocol import ErrorInfo, Job, JobResult
from gputorrent.queue.finish import finish
from gputorrent.queue.lists import JOB_FIELD, MOVES_FIELD, NOTE_LENGTH, bodies, forget
from gputorrent.queue.move import retry_or_fail
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script

log = logging.getLogger(__name__)

ABROAD_HINT_TTL_S = 60  # a hint (`keys.abroad_key`) of a worker gone since is not kept


@dataclass(frozen=True)
class Lease:
    """A job a worker has taken: its request id stays in `processing:{worker_id}` until finished.

    `fence`: the job's move count when taken (see `lists.MOVES_FIELD`); a finish or move naming it is
    refused once the job has moved on. Empty: not checked (a worker reached through the coordinator,
    whose routes find the job by the worker's id and the request id).

    `streamed_before`: its stream already had entries when it was taken (an earlier attempt
    streamed part of it), so the worker reads them to continue after them; a fresh job skips that read.
    `more_queued`: jobs were left in the queues it was taken from, so the next take looks at once
    rather than waiting for a doorbell first (see `pop`).
    """

    job: Job
    fence: str = ""
    streamed_before: bool = False
    taken_at: float = 0.0  # unix time, seconds: when this worker took it (the end of its time queued)
    more_queued: bool = True


@dataclass(frozen=True)
class TakeKeys:
    processing: str  # `processing:{worker_id}` of the cell: where a taken job stays until finished
    doorbells: tuple[str, ...]  # the worker's doorbell, then each model's (its shared queue's)
    sources: tuple[str, ...]  # per band, highest first: the worker's queue, then each model's, as `doorbells`
    lengths: str  # `keys.list_lengths(cell)`
    abroad: str  # at home, `keys.abroad_key`: the cells it is asked to take from (see `read_hints`)
    presence: str  # abroad, the worker's `heartbeat:` in that cell (see `presence_ttl_ms`)


@dataclass(frozen=True)
class TakeArgs:
    worker_id: str
    status_prefix: str  # `job:` and `stream:`: a job's keys are known only once it is taken
    stream_prefix: str
    job_field: str  # the status record's fields that hold the job and its move count
    moves_field: str
    read_hints: bool  # at home: finding nothing, answer the cells of `abroad` (and empty it)
    presence_ttl_ms: int  # abroad: taking a job, write `presence` with this TTL (0: at home, nothing)


# Takes the first job of the first non-empty source into the processing list, marks it running with
# its taker in the job's status (so `end` finds it there), and answers {request id, the job's JSON
# (false when its status record is gone: it expired, long past its deadline), whether its stream
# exists, whether any source still holds a job, the job's move count (its fence)}. Finding nothing,
# it empties the doorbells: every token in them is stale, and a job queued after this script rings
# again. Taking, it rings each shared queue it leaves holding jobs whose doorbell is empty: the token
# its consumer popped may have been that queue's while it took another queue's job (of a higher
# band, or of another model), and the model's other consumers would sleep out their block. An idle
# worker runs it once per blocked wait, so an empty look is one EXISTS over every source, not a pop
# per source: with thousands of idle workers that is most of what they cost Redis (bench/scale.py).
# A look that finds work goes to the first source the lengths index names (every script that moves a
# job keeps it), checking with one EXISTS that no source before it holds a job, rather than popping
# every band of every queue in turn (twenty sources for a worker of one model): the walk is left for
# an index that is wrong (a list changed by hand).
# The job's keys are known only once it is taken: they are made from the prefixes keys.py gives.
# The time it was taken is Redis's own: the script may run long after its caller sent it (see `pop`).
# At home, finding nothing, it answers {0, cell, ...}: the cells a reaper asked it to take from, whose
# shared queues hold jobs of its models that no worker of theirs serves (docs/architecture.md). A take
# in such a cell (from its shared queues only) writes the worker's presence there with the job: the
# reapers of that cell judge the jobs it holds there by it.
_TAKE = Script(
    TakeKeys,
    TakeArgs,
    NOTE_LENGTH
    + """
local function hints()
  if read_hints then
    local cells = redis.call('SMEMBERS', abroad)
    if #cells > 0 then
      redis.call('DEL', abroad)
      return {0, unpack(cells)}
    end
  end
  return false
end
local function taken(i, request_id)
  note_length(sources[i])
  note_length(processing)
  if presence_ttl_ms > 0 then redis.call('SET', presence, '1', 'PX', presence_ttl_ms) end
  local status = status_prefix .. request_id
  local found = redis.call('HMGET', status, job_field, moves_field)
  if found[1] then
    local now = redis.call('TIME')
    local started_at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
    redis.call('HSET', status, 'status', 'running', 'worker_id', worker_id, 'started_at', started_at)
  end
  local streamed = redis.call('EXISTS', stream_prefix .. request_id)
  local more = 0
  if redis.call('EXISTS', unpack(sources, i)) > 0 then more = 1 end
  if more == 1 then
    local per_band = #doorbells
    for p = 2, per_band do
      if redis.call('EXISTS', doorbells[p]) == 0 then
        local j = i + (p - i) % per_band  -- the model's queue of this band, or of the next
        while j <= #sources do
          if redis.call('EXISTS', sources[j]) == 1 then
            redis.call('LPUSH', doorbells[p], '1')
            break
          end
          j = j + per_band
        end
      end
    end
  end
  return {request_id, found[1], streamed, more, found[2] or '0'}
end
local watched = sources
if read_hints then watched = {abroad, unpack(sources)} end
if redis.call('EXISTS', unpack(watched)) == 0 then
  for _, bell in ipairs(doorbells) do redis.call('DEL', bell) end
  return false
end
local indexed = redis.call('HMGET', lengths, unpack(sources))
for i, source in ipairs(sources) do
  if indexed[i] then
    if i == 1 or redis.call('EXISTS', unpack(sources, 1, i - 1)) == 0 then
      local request_id = redis.call('RPOPLPUSH', source, processing)
      if request_id then return taken(i, request_id) end
    end
    break
  end
end
for i, source in ipairs(sources) do
  local request_id = redis.call('RPOPLPUSH', source, processing)
  if request_id then return taken(i, request_id) end
end
for _, bell in ipairs(doorbells) do redis.call('DEL', bell) end
return hints()
""",
)


async def pop(
    redis: RedisClient,
    worker_id: str,
    timeout_s: float,
    models: Sequence[str] = (),
    *,
    result_ttl_s: int,
    wait_first: bool = False,
    presence_ttl_s: float = 0.0,
) -> Lease | None:
    """Move the oldest job of the highest priority band of the worker's queue, or of the shared
    queues of `models` in its cell, into its processing list; None when there is none within about
    `timeout_s`.

    The move is one script, so the job is never only in the worker's memory: if the worker dies,
    the reaper finds it there. With nothing to take, the consumer blocks on the doorbells of those
    queues (one token per job queued), then looks once more. `wait_first`: the caller's last take
    left the queues empty (or found nothing), so any job queued since has rung a doorbell, and the
    first look is skipped. An entry that is not a readable job is not returned: it fails, with
    `result_ttl_s` (see `held_jobs`). A look that finds nothing at home but hints of other cells takes
    from their shared queues, its presence there lasting `presence_ttl_s` (its heartbeat's TTL).
    """
    doorbells, numkeys, take_args = _take_arguments(worker_id, tuple(models))
    taken = None if wait_first else await _TAKE.run_flat(redis, numkeys, take_args)
    while True:
        if taken is None:
            taken = await _wait_and_take(redis, doorbells, timeout_s, numkeys, take_args)
            if taken is None:
                return None
        if taken[0] == 0:  # nothing at home; jobs of its models wait in these cells with nobody to take them
            taken = await _take_abroad(redis, worker_id, tuple(models), [int(c) for c in taken[1:]], presence_ttl_s)
            if taken is None:
                return None
        request_id, body, streamed_before, more_queued, fence = taken
        held_in = keys.processing_key(worker_id, keys.cell_of(str(request_id)))
        entry = (str(request_id), None if body is None else str(body))
        if not (jobs := await held_jobs(redis, held_in, [entry], worker_id, result_ttl_s)):
            taken = await _TAKE.run_flat(redis, numkeys, take_args)  # at home: the hints come back if still due
            continue
        job = jobs[0].model_copy(update={"worker_id": worker_id}) if jobs[0].shared else jobs[0]
        return Lease(
            job=job, fence=str(fence), streamed_before=bool(streamed_before), taken_at=time.time(),
            more_queued=bool(more_queued),
        )  # fmt: skip


async def _take_abroad(
    redis: RedisClient, worker_id: str, models: tuple[str, ...], cells: list[int], presence_ttl_s: float
) -> Any:
    """The first job taken from the shared queues of `models` in `cells` (other cells than the
    worker's), as `_TAKE` answers; None when they hold none now."""
    if presence_ttl_s <= 0:  # a taker that keeps no presence there would have its jobs handed on at once
        return None
    for cell in cells:
        if cell not in keys.cells() or cell == keys.cell_of(worker_id):
            continue  # a hint of a layout this worker does not have
        _, numkeys, take_args = _take_arguments(worker_id, models, cell, presence_ttl_s)
        if (taken := await _TAKE.run_flat(redis, numkeys, take_args)) and taken[0] != 0:
            if taken[3]:  # more wait there: its next look that finds nothing at home comes back
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.sadd(keys.abroad_key(worker_id), str(cell))
                    pipe.expire(keys.abroad_key(worker_id), ABROAD_HINT_TTL_S)
                    await pipe.execute()
            return taken
    return None


def _take_arguments(
    worker_id: str, models: tuple[str, ...], cell: int | None = None, presence_ttl_s: float = 0.0
) -> tuple[list[str], int, tuple[bytes, ...]]:
    """The doorbells, and the key count and arguments of `_TAKE`, for a worker serving `models`: at
    home (its own queue and its cell's shared queues), or in another `cell` (its shared queues only)
    (the same on every take: built and encoded once per key layout)."""
    return _take_arguments_in(keys.layout(), worker_id, models, cell, round(presence_ttl_s * 1000))


@functools.lru_cache(maxsize=256)
def _take_arguments_in(
    layout: tuple[str, ...],  # only part of the cache's key: the names differ by layout (keys.py)
    worker_id: str,
    models: tuple[str, ...],
    abroad: int | None,
    presence_ttl_ms: int,
) -> tuple[list[str], int, tuple[bytes, ...]]:
    home = abroad is None
    cell = keys.cell_of(worker_id) if abroad is None else abroad
    # Hints only where there are other cells: one cell's worker names no `abroad:` key (nor needs it in its ACL).
    hints = home and len(layout) > 1
    # Abroad the worker's own queue's place (per band, and its doorbell's) is a list nothing is pushed on.
    own_bell = keys.worker_doorbell_key(worker_id) if home else keys.nobody_rung(cell)
    doorbells = [own_bell, *(keys.model_doorbell_key(m, cell=cell) for m in models)]
    sources = [
        key
        for band in keys.PRIORITY_BANDS
        for key in (
            keys.queue_key(worker_id, band) if home else keys.nothing_queued(cell),
            *(keys.model_queue_key(m, band, cell=cell) for m in models),
        )
    ]
    numkeys, arguments = _TAKE.call(
        TakeKeys(
            processing=keys.processing_key(worker_id, cell),
            doorbells=tuple(doorbells),
            sources=tuple(sources),
            lengths=keys.list_lengths(cell),
            abroad=keys.abroad_key(worker_id) if hints else keys.heartbeat_key("", cell),
            presence=keys.heartbeat_key("" if home else worker_id, cell),
        ),
        TakeArgs(
            worker_id=worker_id,
            status_prefix=keys.job_prefix(cell),
            stream_prefix=keys.stream_prefix(cell),
            job_field=JOB_FIELD,
            moves_field=MOVES_FIELD,
            read_hints=hints,
            presence_ttl_ms=0 if home else max(1, presence_ttl_ms),
        ),
    )
    return doorbells, numkeys, tuple(argument.encode() for argument in arguments)


async def _wait_and_take(
    redis: RedisClient, doorbells: list[str], timeout_s: float, numkeys: int, take: tuple[bytes, ...]
) -> Any:
    """Block on the doorbells for up to `timeout_s`, then run the take script, in one send: Redis runs
    the take on this connection as soon as the pop returns, with no round trip to the worker between
    them (a job's wake costs one reply, not two)."""
    async with pipelined.borrowed(redis, doorbells[0]) as connection:
        try:
            _, taken = await connection.execute_all(
                ("BLPOP", *doorbells, repr(timeout_s)),  # Redis 6+ takes fractional seconds
                ("EVALSHA", _TAKE.sha, numkeys, *take),
                blocks_s=timeout_s,
            )
        except NoScriptError:  # a new or restarted Redis: the pop ran, the take did not
            taken = await _TAKE.run_flat(redis, numkeys, take)
    return taken


UNREADABLE_MESSAGE = (
    "{reader} could not read the job, which a coordinator newer than it may have queued "
    "(upgrade coordinators and workers together): {cause}"
)


async def held_jobs(
    redis: RedisClient,
    held_in: str,
    entries: Sequence[tuple[str, str | None]],
    worker_id: str,
    result_ttl_s: int,
    *,
    reader: str = "",
    dead: str | None = None,
) -> list[Job]:
    """The readable jobs of `entries`, (request id, the job's JSON or None) of the list `held_in` of
    `worker_id`, in their order. A job that cannot be read fails at once with `unreadable_job` (its
    client learns why, rather than wait for its deadline); one whose JSON is gone (its status record
    expired) is dropped; either way with an error log, rather than crash `reader` (the worker by
    default; the coordinator's reaper). With `dead`, a reaper's: nothing is failed once that holder
    beats again."""
    reader = reader or f"worker {worker_id}"
    jobs = []
    for request_id, body in entries:
        if body is None:  # gone since it was read (finished, moved), or its record expired: then it is dropped
            if await forget(redis, held_in, request_id):
                log.error("%s: dropped job %s from %s: its record is gone", reader, request_id, held_in)
            continue
        try:
            jobs.append(Job.model_validate_json(body))
            continue
        except ValidationError as e:
            first = e.errors()[0]
            cause = f"{'.'.join(map(str, first['loc'])) or 'job'}: {first['msg']}"
        log.error("%s: cannot read job %s (%s): %.200s", reader, request_id, cause, body)
        try:  # the fields a result needs, from whatever JSON is there
            fields = json.loads(body)
        except ValueError:
            fields = {}
        fields = fields if isinstance(fields, dict) else {}
        model = fields.get("model")
        failed = JobResult(
            request_id=request_id, status="failed", model=model if isinstance(model, str) else "", worker_id=worker_id,
            error=ErrorInfo(code="unreadable_job", message=UNREADABLE_MESSAGE.format(reader=reader, cause=cause)),
        )  # fmt: skip
        try:
            await finish(redis, held_in, failed, result_ttl_s, streamed=fields.get("stream") is True, dead=dead)
        except ValueError:  # not even a result can be written from what is there (text that is not UTF-8)
            await forget(redis, held_in, request_id)
    return jobs


async def read_held(redis: RedisClient, held_in: str) -> list[tuple[str, str | None]]:
    """Every entry of the list `held_in` with its job's JSON (None where its record is gone)."""
    request_ids = [str(request_id) for request_id in await redis.lrange(held_in, 0, -1)]
    return list(zip(request_ids, await bodies(redis, request_ids), strict=True))


async def recover(redis: RedisClient, worker_id: str, max_attempts: int, ttl_s: int) -> int:
    """Give the jobs a previous run of this worker left in `processing:{worker_id}` another try here.

    They count an attempt, as the reaper counts them: a job that crashes its worker every time
    fails with `worker_lost` instead of looping through restarts.
    """
    held_in = keys.processing_key(worker_id)
    handled = 0
    # Newest first: each goes to the front of the queue, so the oldest ends up taken first again.
    for job in await held_jobs(redis, held_in, await read_held(redis, held_in), worker_id, ttl_s):
        handled += await retry_or_fail(
            redis, held_in, job, started=True, target=worker_id, max_attempts=max_attempts, ttl_s=ttl_s
        )
    return handled
