"""Job queue operations, shared by coordinator and worker.

A request is findable in Redis from admission to result: `job:{request_id}` holds its status
while it is queued or running, and `result:{request_id}` holds the result after; the switch
from one to the other is a single transaction.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from string import Template
from typing import Any, Literal

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gputorrent import keys, pipelined, pool_stats, replication
from gputorrent.errors import Conflict
from gputorrent.protocol import ErrorInfo, Job, JobResult, JobStatus
from gputorrent.scripts import Script
from gputorrent.telemetry import FailureRecord

log = logging.getLogger(__name__)


async def next_round_robin(redis: Redis) -> int:
    """Advance the seed's `worker_index` counter; the caller takes it modulo the candidates."""
    return int(await redis.incr(keys.WORKER_INDEX))


def waiting_key(job: Job) -> str:
    """The list a queued job waits in: its model's shared queue or its worker's, in its priority band."""
    return keys.model_queue_key(job.model, job.priority) if job.shared else keys.queue_key(job.worker_id, job.priority)


def waiting_keys(job: Job) -> list[str]:
    """Every band of the queue a job waits in (what a bound on that queue counts)."""
    return keys.model_queue_keys(job.model) if job.shared else keys.worker_queue_keys(job.worker_id)


def doorbell_key(job: Job) -> str:
    """The doorbell that wakes a consumer able to take the job."""
    return keys.model_doorbell_key(job.model) if job.shared else keys.worker_doorbell_key(job.worker_id)


# A job pushed onto a queue rings that queue's doorbell: one token per job, trimmed, so a consumer
# blocked in BLPOP on it wakes and takes. Tokens are hints, never jobs: a lost one costs a wait of
# at most the consumer's block timeout.
_RING = Template("""
redis.call('LPUSH', KEYS[$doorbell], '1')
redis.call('LTRIM', KEYS[$doorbell], 0, ARGV[$doorbell_max] - 1)
""")

# Per-key limits, in the enqueue script and in the admission of a stream's follower
# (coordinator/quotas.py); `$name` marks the KEYS and ARGV positions each script gives them.
# A refusal writes nothing but the dropping of stale stream slots (the rate count takes itself back).
STREAM_SLOT_FREE = """
if tonumber(ARGV[$max_streams]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[$streams], '-inf', ARGV[$stale_before])
  if redis.call('ZCARD', KEYS[$streams]) >= tonumber(ARGV[$max_streams]) then return -6 end
end
"""
RATE_COUNT = """
local rpm, tpm = tonumber(ARGV[$rpm]), tonumber(ARGV[$tpm])
if rpm > 0 or tpm > 0 then
  local requests = redis.call('HINCRBY', KEYS[$rate], 'requests', 1)
  local tokens = redis.call('HINCRBY', KEYS[$rate], 'tokens', ARGV[$tokens])
  redis.call('EXPIRE', KEYS[$rate], ARGV[$rate_ttl])
  if (rpm > 0 and requests > rpm) or (tpm > 0 and tokens > tpm) then
    redis.call('HINCRBY', KEYS[$rate], 'requests', -1)
    redis.call('HINCRBY', KEYS[$rate], 'tokens', -tonumber(ARGV[$tokens]))
    return -5
  end
end
"""
STREAM_SLOT_TAKE = """
if tonumber(ARGV[$max_streams]) > 0 then redis.call('ZADD', KEYS[$streams], ARGV[$now], ARGV[$slot]) end
"""
Refusal = Literal["queue", "model_queue", "rate", "streams"]
REFUSALS: dict[int, Refusal] = {-1: "queue", -4: "model_queue", -5: "rate", -6: "streams"}  # the scripts' answers

_LIMIT_POSITIONS = {
    "rate": 8, "streams": 9,  # KEYS
    "tokens": 17, "rpm": 18, "tpm": 19, "rate_ttl": 20, "max_streams": 21, "stale_before": 22, "now": 23, "slot": 2,
}  # fmt: skip

# The whole admission of a job in one script, so a request costs one round trip here:
# - ARGV[1] = '1': the request carries an idempotency key (KEYS[4]); one seen before returns the
#   request id it admitted and enqueues nothing;
# - another owner's request id (KEYS[5]) returns -3, the same owner's -7 while its job or result
#   exists (admitted before); with ARGV[15] = '1', a dead worker (no heartbeat, KEYS[7]) returns -2;
# - the bounds: the job's own queue (ARGV[16] bands from KEYS[10]) holds at most ARGV[11] jobs
#   (-1); its model, across its shared queue (the KEYS after those) and the queues of the
#   workers serving it (ARGV[25], counted by the caller), at most ARGV[24] (-4);
# - the caller's key: a free stream slot (-6), then its rate (-5), then the slot is taken.
# A zero limit is no limit.
_ENQUEUE = Script(
    """
if ARGV[1] == '1' then
  local existing = redis.call('GET', KEYS[4])
  -- A key whose job and result are both gone (expired) is free again. The names follow keys.py.
  if existing then
    local job_exists = redis.call('EXISTS', 'job:' .. existing) == 1
    if job_exists or redis.call('EXISTS', 'result:' .. existing) == 1 then return existing end
  end
end
local owner = redis.call('GET', KEYS[5])
if owner and owner ~= ARGV[9] then return -3 end
if owner and (redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', 'result:' .. ARGV[2]) == 1) then
  -- The caller's own request id, admitted before (a retry after a 503): nothing new. The touch is a
  -- write, so the WAIT sent with this call covers the first admission too.
  redis.call('EXPIRE', KEYS[5], ARGV[10])
  return -7
end
if ARGV[15] == '1' and redis.call('EXISTS', KEYS[7]) == 0 then return -2 end
local function queued(first, last)
  local n = 0
  for i = first, last do n = n + redis.call('LLEN', KEYS[i]) end
  return n
end
local own_last = 9 + tonumber(ARGV[16])
local bound, model_bound = tonumber(ARGV[11]), tonumber(ARGV[24])
if bound > 0 and queued(10, own_last) >= bound then return -1 end
if model_bound > 0 and queued(own_last + 1, #KEYS) + tonumber(ARGV[25]) >= model_bound then return -4 end
"""
    + Template(STREAM_SLOT_FREE + RATE_COUNT + STREAM_SLOT_TAKE).substitute(_LIMIT_POSITIONS)
    + """
if ARGV[1] == '1' then redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[3]) end
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker_id', ARGV[4], 'model', ARGV[5], 'stream', ARGV[8],
  'priority', ARGV[13], 'enqueued_at', ARGV[14])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[3], ARGV[7], ARGV[2]) end
redis.call('SET', KEYS[5], ARGV[9], 'EX', ARGV[10])
"""
    + _RING.substitute(doorbell=6, doorbell_max=12)
    + """
return ARGV[2]
"""
)


@dataclass(frozen=True)
class Limits:
    """What admitting a job must respect, checked (and counted) in the script that enqueues it.
    Every limit is off at 0."""

    max_queued: int = 0  # jobs in the queue the job joins (every band)
    max_model_queued: int = 0  # jobs of its model anywhere: its shared queue and its workers' queues
    queued_at_model_workers: int = 0  # of those, the ones in the workers' queues (from the pool snapshot)
    rate_key: str = ""  # the caller's counters for this minute
    tokens: int = 0  # this request's token estimate
    rpm: int = 0
    tpm: int = 0
    rate_ttl_s: int = 0
    streams_key: str = ""  # the caller's open streams; a streamed job takes a slot
    max_streams: int = 0
    stale_before: float = 0.0  # slots opened before this time are dropped first (their coordinator died)


class Refused(Exception):
    """A limit turned the job away: nothing was written."""

    def __init__(self, limit: Refusal) -> None:
        super().__init__(limit)
        self.limit: Refusal = limit


async def enqueue(
    redis: Redis,
    job: Job,
    ttl_s: int,
    idempotency_key: str | None = None,
    owner: str = "anonymous",
    limits: Limits = Limits(),
    *,
    require_alive: bool = False,
) -> str:
    """Record the job as queued with its `owner` (an API key id), note its deadline and push it onto
    the list it waits in (`waiting_key`), ringing that queue's doorbell, atomically, once `limits`
    allow it (a streamed job then holds one of the owner's stream slots). Returns once the replicas
    the client wants have it (`replication.run`).

    Returns the request id admitted: `job.request_id`, or, when `idempotency_key` was seen
    before (and its job or result still exists), the id it admitted then (and nothing is
    enqueued, nothing counted).

    Raises:
        Refused: a limit of `limits` turned it away (which one: `limit`); nothing was written.
        Conflict: another owner's request has this id.
        AdmittedBefore: this owner's request with this id was admitted before (a retry).
        WorkerGone: with `require_alive`, the job's worker is dead or left; route it again.
        replication.Unreplicated: the replicas did not have it within the bound; it is admitted on the
            primary, unacknowledged (a repeat with the same request id or idempotency key confirms it).
    """
    # The status record must outlive a long deadline, or a queued job would lose its status.
    record_ttl_s = ttl_s + max(0, int((job.deadline or 0) - job.enqueued_at))
    own_bands = waiting_keys(job)
    model_bands = keys.model_queue_keys(job.model) if limits.max_model_queued else []
    stream_slot = limits.max_streams if job.stream and limits.streams_key else 0
    admitted = await replication.run(
        redis, "admission", job.request_id, _ENQUEUE, 9 + len(own_bands) + len(model_bands),
        keys.job_key(job.request_id), waiting_key(job), keys.DEADLINES,
        keys.idempotency_key(idempotency_key or ""), keys.owner_key(job.request_id), doorbell_key(job),
        keys.heartbeat_key(job.worker_id or ""), limits.rate_key or "-", limits.streams_key or "-",
        *own_bands, *model_bands,
        "1" if idempotency_key else "0", job.request_id, str(record_ttl_s), job.worker_id, job.model,
        job.model_dump_json(), repr(job.deadline) if job.deadline is not None else "", "1" if job.stream else "0",
        owner, str(record_ttl_s + ttl_s),  # the owner outlives the result it guards
        str(limits.max_queued), str(keys.DOORBELL_MAX), str(job.priority), repr(job.enqueued_at),
        "1" if require_alive and not job.shared else "0", str(len(own_bands)),
        str(limits.tokens), str(limits.rpm if limits.rate_key else 0), str(limits.tpm if limits.rate_key else 0),
        str(limits.rate_ttl_s), str(stream_slot), repr(limits.stale_before), repr(time.time()),
        str(limits.max_model_queued), str(limits.queued_at_model_workers),
    )  # fmt: skip
    if isinstance(admitted, int) and admitted in REFUSALS:
        raise Refused(REFUSALS[admitted])
    if admitted == -2:
        raise WorkerGone(job.worker_id or "")
    if admitted == -3:
        raise Conflict(f"request_id {job.request_id!r} is taken by another client; choose another")
    if admitted == -7:
        raise AdmittedBefore(job.request_id)
    return str(admitted)


class AdmittedBefore(Exception):
    """The caller's request id was admitted before (its job, or its result, still exists): nothing new
    is enqueued, and the earlier admission is on the replicas wanted."""


class WorkerGone(Exception):
    """The worker a job was routed to left the pool (its heartbeat is gone) before the job was queued."""


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


# Takes the first job of the first non-empty source (KEYS[2 + ARGV[1]..], highest priority first)
# into the processing list (KEYS[1]), marks it running with its taker in the job's status (so
# `end` finds it there), and answers {raw, whether its stream exists, whether any source still
# holds a job}. Finding nothing, it empties the doorbells (KEYS[2..1 + ARGV[1]]): every token in
# them is stale, and a job queued after this script rings again. An idle worker runs it once per
# blocked wait, so an empty look is one EXISTS over every source, not a pop per source: with
# thousands of idle workers that is most of what they cost Redis (bench/scale.py). ARGV[3] and ARGV[4] are the
# prefixes of a job's status and stream keys. The time it was taken is Redis's own: the script may
# run long after its caller sent it (see `pop`).
_TAKE = Script("""
local bells = tonumber(ARGV[1])
if redis.call('EXISTS', unpack(KEYS, 2 + bells)) == 0 then
  for i = 2, 1 + bells do redis.call('DEL', KEYS[i]) end
  return false
end
for i = 2 + bells, #KEYS do
  local raw = redis.call('RPOPLPUSH', KEYS[i], KEYS[1])
  if raw then
    local request_id = string.match(raw, '"request_id":"([^"]*)"')
    local streamed = 0
    if request_id then
      local status = ARGV[3] .. request_id
      if redis.call('EXISTS', status) == 1 then
        local now = redis.call('TIME')
        local started_at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
        redis.call('HSET', status, 'status', 'running', 'worker_id', ARGV[2], 'started_at', started_at)
      end
      streamed = redis.call('EXISTS', ARGV[4] .. request_id)
    end
    local more = 0
    for j = i, #KEYS do
      if redis.call('LLEN', KEYS[j]) > 0 then more = 1 break end
    end
    return {raw, streamed, more}
  end
end
for i = 2, 1 + bells do redis.call('DEL', KEYS[i]) end
return false
""")


_TAKE_PREFIXES = (keys.job_key(""), keys.stream_key(""))


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
    taken = None if wait_first else await _TAKE.run(redis, numkeys, *take_args)
    while True:
        if taken is None:
            taken = await _wait_and_take(redis, doorbells, timeout_s, numkeys, take_args)
            if taken is None:
                return None
        raw, streamed_before, more_queued = str(taken[0]), bool(taken[1]), bool(taken[2])
        if (job := await held_job(redis, worker_id, raw, result_ttl_s)) is None:
            taken = await _TAKE.run(redis, numkeys, *take_args)
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
    take_keys = [keys.processing_key(worker_id), *doorbells, *sources]
    arguments = (*take_keys, str(len(doorbells)), worker_id, *_TAKE_PREFIXES)
    return doorbells, len(take_keys), tuple(argument.encode() for argument in arguments)


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
            taken = await _TAKE.run(redis, numkeys, *take)
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


# Every script below first removes the job from the list that holds it and does nothing
# if that fails: whoever removes it owns it, so a job is never finished or moved twice.
# KEYS[1] is that list; with ARGV[1] = '1' (a reaper acting on a dead holder), KEYS[2], the
# holder's heartbeat, and KEYS[3], `liveness:grace`, must both be absent: the holder is still
# dead, and Redis has been in sight long enough for its absence to mean so.
# A reaper's move (ARGV[1] = '1') of a holder that beats again, or while `liveness:grace` holds: nothing.
_HOLDER_DEAD = """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return 0 end
"""
_GUARD = (
    _HOLDER_DEAD
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 0 then return 0 end
"""
)


def _guard_keys(dead: str | None) -> tuple[str, str]:
    """KEYS[2] and KEYS[3] of `_GUARD`: for a reaper's move, the dead holder's heartbeat and
    `liveness:grace`. A worker's own call reads neither and names `heartbeat:` in their place, so its
    Redis user needs no access to `liveness:grace` (docs/security.md lists what it has)."""
    if dead is None:
        return keys.heartbeat_key(""), keys.heartbeat_key("")
    return keys.heartbeat_key(dead), keys.LIVENESS_GRACE


_FINISH = Script(
    _HOLDER_DEAD
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 0 then
  -- A repeat of this very store (its WAIT came short, or its reply was lost): touch the result, a
  -- write, so the WAIT sent with this call covers the first one too.
  if redis.call('GET', KEYS[4]) == ARGV[3] then
    redis.call('EXPIRE', KEYS[4], ARGV[4])
    return 1
  end
  return 0
end
redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4])
redis.call('DEL', KEYS[5])
redis.call('ZREM', KEYS[7], ARGV[7])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[6], '*', 'result', ARGV[3])
  redis.call('EXPIRE', KEYS[6], ARGV[4])
end
if ARGV[8] == '1' then
  redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\\n' .. ARGV[3])
else
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return 1
"""
)

_REQUEUE = Script(
    _GUARD
    + """
redis.call('RPUSH', KEYS[4], ARGV[3])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[5], 'status', 'queued', 'worker_id', ARGV[4])
end
"""
    + _RING.substitute(doorbell=6, doorbell_max=5)
    + """
return 1
"""
)


async def finish(
    redis: Redis, held_in: str, raw: str, result: JobResult, ttl_s: int, *, streamed: bool, dead: str | None = None
) -> bool:
    """Remove `raw` from the list `held_in` and store the result, atomically; False (nothing written)
    when `raw` is no longer there (the lease was lost), or, for a reaper acting on `dead`, when its
    heartbeat is back or `liveness:grace` holds. A repeat that finds this very result stored already
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
    finished = await replication.run(
        redis, "result", request_id, _FINISH, 7,
        held_in, *_guard_keys(dead), keys.result_key(request_id),
        keys.job_key(request_id), keys.stream_key(request_id), keys.DEADLINES,
        "1" if dead else "0", raw, result_json, str(ttl_s), "1" if streamed else "0",
        keys.RESULTS_CHANNEL, request_id, "1" if announces_result(result_json, streamed=streamed) else "0",
    )  # fmt: skip
    return bool(finished)


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


async def requeue(redis: Redis, source_key: str, raw: str, job: Job, *, dead: str | None = None) -> bool:
    """Move `raw` from `source_key` to the front of the queue `job` waits in (its worker's, or for a
    shared job its model's) as `job`; False when `raw` is no longer there, or when `dead`'s heartbeat
    is back (it beat again, or re-registered) or `liveness:grace` holds."""
    moved = await _REQUEUE.run(
        redis, 6,
        source_key, *_guard_keys(dead), waiting_key(job),
        keys.job_key(job.request_id), doorbell_key(job),
        "1" if dead else "0", raw, job.model_dump_json(), job.worker_id, str(keys.DOORBELL_MAX),
    )  # fmt: skip
    return bool(moved)


async def retry_or_fail(
    redis: Redis,
    source_key: str,
    raw: str,
    *,
    started: bool,
    target: str | None,
    max_attempts: int,
    ttl_s: int,
    dead: str | None = None,
) -> bool:
    """Give a job its holder never finished another try on `target`, or fail it with `worker_lost`.

    A job that had started counts an attempt (one still queued does not); past `max_attempts` it
    fails, so a job that kills every worker it touches cannot take the pool down. A shared job
    goes back to its model's shared queue whatever `target` is. With no `target` (nobody serves
    the model now) any other job stays where it is. With `dead` (a reaper's move) nothing happens
    once that worker's heartbeat is back, or while `liveness:grace` holds. A job whose entry cannot
    be read is dropped with an error log. Returns whether the job was moved or failed.
    """
    try:
        job = Job.model_validate_json(raw)
    except ValueError:
        log.error("dropping an unreadable job from %s: %.200s", source_key, raw)
        return bool(await redis.lrem(source_key, 1, raw))
    attempt = job.attempt + 1 if started else job.attempt
    if attempt > max_attempts:
        message = f"the job's worker stopped before finishing it, {job.attempt} times; giving up"
        failed = JobResult(
            request_id=job.request_id, status="failed", model=job.model, worker_id=job.worker_id,
            error=ErrorInfo(code="worker_lost", message=message),
        )  # fmt: skip
        if not await finish(redis, source_key, raw, failed, ttl_s, streamed=job.stream, dead=dead):
            return False
        # No worker finished it, so no worker reports it: the pool's failure list hears it here.
        await pool_stats.record_failure(redis, FailureRecord(
            at=time.time(), request_id=job.request_id, model=job.model, worker_id=job.worker_id or "",
            code="worker_lost", message=message,
        ))  # fmt: skip
        return True
    if target is None and not job.shared:
        return False
    worker_id = "" if job.shared else target
    moved = job.model_copy(update={"worker_id": worker_id, "attempt": attempt, "enqueued_at": time.time()})
    return await requeue(redis, source_key, raw, moved, dead=dead)


END_ATTEMPTS = 3


async def end(redis: Redis, request_id: str, error: ErrorInfo, ttl_s: int) -> JobResult | None:
    """End a job before its worker finishes it: the failed result with `error` is written at once.

    A queued job never runs; a running one loses its lease, so its worker's result is refused,
    and its worker is told (`cancel:{request_id}` and the `jobs:ended` channel) to stop at its
    next token. Returns the result written, or None when the job already has a result or is unknown.
    """
    for _ in range(END_ATTEMPTS):  # a job moving between lists right now is found on the next look
        status = await redis.hgetall(keys.job_key(request_id))
        if not status:
            return None
        worker_id = str(status["worker_id"])
        # Where it can be: its worker's queue (any band) or processing list, or its model's shared queue.
        lists = keys.model_queue_keys(str(status["model"]))
        if worker_id:
            lists = [*keys.worker_queue_keys(worker_id), keys.processing_key(worker_id), *lists]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.cancel_key(request_id), error.code, ex=ttl_s)
            pipe.publish(keys.ENDED_CHANNEL, request_id)
            for held_in in lists:
                pipe.lrange(held_in, 0, -1)
            _, _, *contents = await pipe.execute()
        for held_in, entries in zip(lists, contents, strict=True):
            for raw in entries:
                if request_id not in raw:  # cheap filter before parsing
                    continue
                try:
                    job = Job.model_validate_json(raw)
                except ValueError:
                    continue
                if job.request_id != request_id:
                    continue
                ended = JobResult(
                    request_id=request_id, status="failed", model=job.model, worker_id=worker_id, error=error
                )
                if await finish(redis, held_in, str(raw), ended, ttl_s, streamed=job.stream):
                    log.info("request %s ended: %s", request_id, error.code)
                    return ended
    return None


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
            request_id=request_id, status=status["status"], worker_id=status["worker_id"] or None,
            model=status["model"], stream=status.get("stream") == "1",
        )  # fmt: skip
    return None
