"""Admission: a job recorded as queued and pushed onto the list it waits in, within its limits, in
one script (so a request costs one round trip here)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal

from gputorrent import keys, replication
from gputorrent.errors import Conflict
from gputorrent.protocol import Job
from gputorrent.queue.lists import JOB_FIELD, NOTE_LENGTH, RING, doorbell_key, waiting_key, waiting_keys
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.scripts import Script

log = logging.getLogger(__name__)


async def next_round_robin(redis: RedisClient) -> int:
    """Advance the seed's `worker_index` counter; the caller takes it modulo the candidates."""
    return int(await redis.incr(keys.worker_index()))


@dataclass(frozen=True)
class LimitKeys:
    rate: str  # the caller's counters for this minute (`ratelimit:`)
    streams: str  # the caller's open streams (`streams:`)


@dataclass(frozen=True)
class LimitArgs:
    tokens: int  # this request's token estimate
    rpm: int  # 0: no limit
    tpm: int
    rate_ttl_s: int
    max_streams: int  # 0: the request takes no stream slot
    stale_before: float  # slots opened before this time are dropped first (their coordinator died)
    now: float
    slot: str  # the stream slot's member: the request id


# Per-key limits, in the admission script and in the admission of a stream's follower
# (coordinator/quotas.py), over the fields of `LimitKeys` and `LimitArgs`. A refusal writes nothing
# but the dropping of stale stream slots (the rate count takes itself back).
STREAM_SLOT_FREE = """
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', streams, '-inf', stale_before)
  if redis.call('ZCARD', streams) >= max_streams then return -6 end
end
"""
RATE_COUNT = """
if rpm > 0 or tpm > 0 then
  local requests = redis.call('HINCRBY', rate, 'requests', 1)
  local counted = redis.call('HINCRBY', rate, 'tokens', tokens)
  redis.call('EXPIRE', rate, rate_ttl_s)
  if (rpm > 0 and requests > rpm) or (tpm > 0 and counted > tpm) then
    redis.call('HINCRBY', rate, 'requests', -1)
    redis.call('HINCRBY', rate, 'tokens', -tokens)
    return -5
  end
end
"""
STREAM_SLOT_TAKE = """
if max_streams > 0 then redis.call('ZADD', streams, now, slot) end
"""
Refusal = Literal["queue", "model_queue", "rate", "streams"]
REFUSALS: dict[int, Refusal] = {-1: "queue", -4: "model_queue", -5: "rate", -6: "streams"}  # the scripts' answers

# The per-key limits alone (a stream's follower; a job in another cell than the key's counters).
_COUNT = Script(LimitKeys, LimitArgs, STREAM_SLOT_FREE + RATE_COUNT + STREAM_SLOT_TAKE + "return 1")


@dataclass(frozen=True)
class _GiveBackArgs:
    tokens: int
    counted: bool  # the request was counted (a rate limit is on)
    slot: str  # its stream slot's member ('' : none taken)


# What `_COUNT` took for a request that was then not admitted.
_GIVE_BACK = Script(LimitKeys, _GiveBackArgs, """
if counted then
  redis.call('HINCRBY', rate, 'requests', -1)
  redis.call('HINCRBY', rate, 'tokens', -tokens)
end
if slot ~= '' then redis.call('ZREM', streams, slot) end
return 1
""")  # fmt: skip


@dataclass(frozen=True)
class AdmitKeys(LimitKeys):
    status: str  # `job:{request_id}`
    result: str  # `result:{request_id}`
    owner: str  # `owner:{request_id}`
    waiting: str  # the list the job joins
    doorbell: str  # that list's doorbell
    deadlines: str
    lengths: str  # `keys.list_lengths()`
    heartbeat: str  # of the job's worker
    idempotency: str  # `idempotency:{key}`
    seen_status: str  # `job:` and `result:` of `seen`, the request id the idempotency key held when looked at
    seen_result: str
    own_bands: tuple[str, ...]  # every band of the queue the job joins
    model_bands: tuple[str, ...]  # every band of its model's shared queue (when its model's queue is bounded)


@dataclass(frozen=True)
class AdmitArgs(LimitArgs):
    request_id: str
    job: str  # the job's JSON
    job_field: str  # the status record's field that holds it
    worker_id: str
    model: str
    priority: str
    enqueued_at: str
    stream: bool
    deadline: float | None
    record_ttl_s: int
    owner_id: str  # the API key id that submits it
    owner_ttl_s: int
    idempotent: bool  # the request carries an idempotency key
    seen: str  # what the key held when the caller looked ('' for nothing): its job and result were gone
    require_alive: bool  # the job's worker must beat
    max_queued: int  # bound on `own_bands`
    max_model_queued: int  # bound on `model_bands` and the queues of the workers serving the model
    queued_at_model_workers: int  # of those, the ones in the workers' queues (from the pool snapshot)
    doorbell_max: int


# Answers the request id admitted, or a negative refusal:
# - an idempotency key seen before returns the request id it admitted and enqueues nothing, unless
#   it still holds `seen` (the caller found that one's job and result gone): then it is free again;
# - another owner's request id returns -3, the same owner's -7 while its job or result exists
#   (admitted before); with `require_alive`, a dead worker (no heartbeat) returns -2;
# - the bounds: the job's own queue (-1), its model's queued jobs across the pool (-4);
# - the caller's key: a free stream slot (-6), then its rate (-5), then the slot is taken.
# A zero limit is no limit.
_ADMIT = Script(
    AdmitKeys,
    AdmitArgs,
    NOTE_LENGTH
    + """
if idempotent then
  local existing = redis.call('GET', idempotency)
  if existing and (existing ~= seen or redis.call('EXISTS', seen_status, seen_result) > 0) then return existing end
end
local owned_by = redis.call('GET', owner)
if owned_by and owned_by ~= owner_id then return -3 end
if owned_by and redis.call('EXISTS', status, result) > 0 then
  -- The caller's own request id, admitted before (a retry after a 503): nothing new. The touch is a
  -- write, so the WAIT sent with this call covers the first admission too.
  redis.call('EXPIRE', owner, owner_ttl_s)
  return -7
end
if require_alive and redis.call('EXISTS', heartbeat) == 0 then return -2 end
local function queued(bands)
  local n = 0
  for _, band in ipairs(bands) do n = n + redis.call('LLEN', band) end
  return n
end
if max_queued > 0 and queued(own_bands) >= max_queued then return -1 end
if max_model_queued > 0 and queued(model_bands) + queued_at_model_workers >= max_model_queued then return -4 end
"""
    + STREAM_SLOT_FREE
    + RATE_COUNT
    + STREAM_SLOT_TAKE
    + """
if idempotent then redis.call('SET', idempotency, request_id, 'EX', record_ttl_s) end
redis.call('HSET', status, 'status', 'queued', 'worker_id', worker_id, 'model', model, 'stream', stream and '1' or '0',
  'priority', priority, 'enqueued_at', enqueued_at, job_field, job)
redis.call('EXPIRE', status, record_ttl_s)
redis.call('LPUSH', waiting, request_id)
note_length(waiting)
if deadline then redis.call('ZADD', deadlines, deadline, request_id) end
redis.call('SET', owner, owner_id, 'EX', owner_ttl_s)
"""
    + RING
    + """
return request_id
""",
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

    @property
    def cell(self) -> int:
        """The cell of `rate_key` and `streams_key` (the caller's key id's: `keys.rate_key`)."""
        counter = self.rate_key or self.streams_key
        return keys.cell_named(counter) if counter else keys.HOME_CELL

    def keys(self, cell: int) -> LimitKeys:
        """The limits' keys for a script of `cell` (an unused one named in that cell)."""
        return LimitKeys(rate=self.rate_key or keys.unused(cell), streams=self.streams_key or keys.unused(cell))

    def counts(self, *, streamed: bool) -> bool:
        """Whether any of these limits counts a request (`streamed`: a stream's). Their counters are in the
        caller's key's cell (`cell`): a job of another cell has them counted in a step of their own."""
        counted = self.args(slot="", streamed=streamed)
        return bool(counted.rpm or counted.tpm or counted.max_streams)

    async def count(self, redis: RedisClient, *, slot: str, streamed: bool) -> None:
        """Count a request against these limits alone (`slot`: its stream slot, taken when `streamed`).

        Raises:
            Refused: a limit turned it away; nothing was counted.
        """
        answer = await _COUNT.run(redis, self.keys(self.cell), self.args(slot=slot, streamed=streamed))
        if answer in REFUSALS:
            raise Refused(REFUSALS[answer])

    async def give_back(self, redis: RedisClient, *, slot: str, streamed: bool) -> None:
        """Take back what `count` counted for a request that was then not admitted (not its stream slot
        when `streamed` is False: a repeat of an admitted request shares its slot). A failure to reach
        Redis is logged, and the count stays one too high for the rest of the minute."""
        taken = self.args(slot=slot, streamed=streamed)
        back = _GiveBackArgs(tokens=self.tokens, counted=bool(taken.rpm or taken.tpm),
                             slot=slot if taken.max_streams else "")  # fmt: skip
        try:
            await _GIVE_BACK.run(redis, self.keys(self.cell), back)
        except REDIS_FAILURES as e:
            log.warning("request %s was not admitted, and its count against its key's limits stays: %s", slot, e)

    def args(self, *, slot: str, streamed: bool) -> LimitArgs:
        """The limits' script arguments for one request (`slot`: its id); only a streamed one takes a slot."""
        counted = bool(self.rate_key)
        return LimitArgs(
            tokens=self.tokens, rpm=self.rpm if counted else 0, tpm=self.tpm if counted else 0,
            rate_ttl_s=self.rate_ttl_s, max_streams=self.max_streams if streamed and self.streams_key else 0,
            stale_before=self.stale_before, now=time.time(), slot=slot,
        )  # fmt: skip


class Refused(Exception):
    """A limit turned the job away: nothing was written."""

    def __init__(self, limit: Refusal) -> None:
        super().__init__(limit)
        self.limit: Refusal = limit


class AdmittedBefore(Exception):
    """The caller's request id was admitted before (its job, or its result, still exists): nothing new
    is enqueued, and the earlier admission is on the replicas wanted."""


class WorkerGone(Exception):
    """The worker a job was routed to left the pool (its heartbeat is gone) before the job was queued."""


async def enqueue(
    redis: RedisClient,
    job: Job,
    ttl_s: int,
    idempotency_key: str | None = None,
    owner: str = "anonymous",
    limits: Limits = Limits(),
    *,
    require_alive: bool = False,
    seen: str | None = None,
) -> str:
    """Record the job (its JSON in its status record) as queued with its `owner` (an API key id), note
    its deadline and push its request id onto the list it waits in (`waiting_key`), ringing that
    queue's doorbell, atomically, once `limits` allow it (a streamed job then holds one of the
    owner's stream slots). Returns once the replicas the client wants have it (`replication.run`).

    Returns the request id admitted: `job.request_id`, or, when `idempotency_key` was seen
    before (and its job or result still exists), the id it admitted then (and nothing is
    enqueued, nothing counted). `seen`: the request id the caller found under `idempotency_key`,
    whose job and result were both gone, so the key is free again unless it changed since.

    Raises:
        Refused: a limit of `limits` turned it away (which one: `limit`); nothing was written.
        Conflict: another owner's request has this id.
        AdmittedBefore: this owner's request with this id was admitted before (a retry).
        WorkerGone: with `require_alive`, the job's worker is dead or left; route it again.
        replication.Unreplicated: the replicas did not have it within the bound; it is admitted on the
            primary, unacknowledged (a repeat with the same request id or idempotency key confirms it).
    """
    request_id = job.request_id
    cell = keys.cell_of(request_id)
    if cell == limits.cell:
        return await _admit(redis, job, ttl_s, idempotency_key, owner, limits, require_alive, seen)
    in_cell = dataclasses.replace(limits, rate_key="", streams_key="")  # the key's counters are in its own cell
    if not limits.counts(streamed=job.stream):
        return await _admit(redis, job, ttl_s, idempotency_key, owner, in_cell, require_alive, seen)
    # Counted first, given back when nothing new was admitted. (So a request over its key's limits is
    # refused before its job's own checks, in this order only.)
    await limits.count(redis, slot=request_id, streamed=job.stream)
    try:
        answer = await _admit(redis, job, ttl_s, idempotency_key, owner, in_cell, require_alive, seen)
    except AdmittedBefore:  # a repeat: the first admission holds the count, and the stream slot it shares
        await limits.give_back(redis, slot=request_id, streamed=False)
        raise
    except (Refused, WorkerGone, Conflict):  # nothing admitted (a lost reply or an unacknowledged one: not known)
        await limits.give_back(redis, slot=request_id, streamed=job.stream)
        raise
    if answer != request_id:  # the idempotency key's earlier admission stands
        await limits.give_back(redis, slot=request_id, streamed=job.stream)
    return answer


async def _admit(
    redis: RedisClient, job: Job, ttl_s: int, idempotency_key: str | None, owner: str, limits: Limits,
    require_alive: bool, seen: str | None,
) -> str:  # fmt: skip
    """`enqueue` in one script of the job's cell, `limits` counted in it."""
    request_id = job.request_id
    # The status record must outlive a long deadline, or a queued job would lose its status.
    record_ttl_s = ttl_s + max(0, int((job.deadline or 0) - job.enqueued_at))
    cell = keys.cell_of(request_id)
    limit_keys = limits.keys(cell)
    admit_keys = AdmitKeys(
        rate=limit_keys.rate, streams=limit_keys.streams,
        status=keys.job_key(request_id), result=keys.result_key(request_id), owner=keys.owner_key(request_id),
        waiting=waiting_key(job), doorbell=doorbell_key(job), deadlines=keys.deadlines(cell),
        lengths=keys.list_lengths(cell),
        # A routed job's worker is of its cell (its request id was drawn there); a shared job has none.
        heartbeat=keys.heartbeat_key(job.worker_id) if job.worker_id else keys.heartbeat_key("", cell),
        idempotency=keys.idempotency_key(idempotency_key or "", cell),
        seen_status=keys.job_key(seen) if seen else keys.unused(cell),
        seen_result=keys.result_key(seen) if seen else keys.unused(cell),
        own_bands=waiting_keys(job),
        model_bands=tuple(keys.model_queue_keys(job.model, cell=cell)) if limits.max_model_queued else (),
    )  # fmt: skip
    admit_args = AdmitArgs(
        **vars(limits.args(slot=request_id, streamed=job.stream)),
        request_id=request_id, job=job.model_dump_json(), job_field=JOB_FIELD, worker_id=job.worker_id, model=job.model,
        priority=str(job.priority), enqueued_at=repr(job.enqueued_at), stream=job.stream, deadline=job.deadline,
        record_ttl_s=record_ttl_s, owner_id=owner, owner_ttl_s=record_ttl_s + ttl_s,  # the owner outlives the result
        idempotent=idempotency_key is not None, seen=seen or "", require_alive=require_alive and not job.shared,
        max_queued=limits.max_queued, max_model_queued=limits.max_model_queued,
        queued_at_model_workers=limits.queued_at_model_workers, doorbell_max=keys.DOORBELL_MAX,
    )  # fmt: skip
    admitted = await replication.run(redis, "admission", request_id, _ADMIT, admit_keys, admit_args)
    if isinstance(admitted, int) and admitted in REFUSALS:
        raise Refused(REFUSALS[admitted])
    if admitted == -2:
        raise WorkerGone(job.worker_id or "")
    if admitted == -3:
        raise Conflict(f"request_id {request_id!r} is taken by another client; choose another")
    if admitted == -7:
        raise AdmittedBefore(request_id)
    return str(admitted)
