"""Ending a job before its worker finishes it (cancelled, timed out), and reading where a job stands."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gputorrent import keys
from gputorrent.protocol import ErrorInfo, JobResult, JobStatus
from gputorrent.queue.finish import finish
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script

log = logging.getLogger(__name__)


END_ATTEMPTS = 3
_STATUS_FIELDS = ("status", "worker_id", "model", "stream")  # not the job itself: it may be large


@dataclass(frozen=True)
class _LookupKeys:
    result: str
    job: str


@dataclass(frozen=True)
class _LookupArgs:
    fields: tuple[str, ...]


# A script, not a transaction: one read on the hot path (redis-py's cluster client runs each command
# of a transaction on a thread of its own, blocking the event loop).
_LOOKUP = Script(
    _LookupKeys,
    _LookupArgs,
    """
local found = redis.call('GET', result)
if found then return {found} end
return {false, unpack(redis.call('HMGET', job, unpack(fields)))}
""",
)


async def end(redis: RedisClient, request_id: str, error: ErrorInfo, ttl_s: int) -> JobResult | None:
    """End a job before its worker finishes it: the failed result with `error` is written at once.

    A queued job never runs; a running one loses its lease, so its worker's result is refused,
    and its worker is told (`cancel:{request_id}` and its `jobs:ended:{worker_id}` channel) to stop
    at its next token. Returns the result written, or None when the job already has a result or is unknown.
    """
    for _ in range(END_ATTEMPTS):  # a job moving between lists right now is found on the next look
        found = await redis.hmget(keys.job_key(request_id), _STATUS_FIELDS)
        if found[0] is None:
            return None
        worker_id, model, streamed = str(found[1]), str(found[2]), found[3] == "1"
        # Where it can be, all in its cell: its worker's queue (any band) or the worker's processing list
        # there, or its model's shared queue.
        cell = keys.cell_of(request_id)
        lists = keys.model_queue_keys(model, cell=cell)
        if worker_id:
            lists = [*keys.worker_queue_keys(worker_id), keys.processing_key(worker_id, cell), *lists]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.cancel_key(request_id), error.code, ex=ttl_s)
            for held_in in lists:
                pipe.lpos(held_in, request_id)
            if worker_id:  # a shared job no worker has taken yet runs nowhere
                # By name: redis-py's cluster pipeline refuses `publish` (any node will do: it reaches every node).
                pipe.execute_command("PUBLISH", keys.ended_channel(worker_id), request_id)
            positions = (await pipe.execute())[1 : 1 + len(lists)]
        ended = JobResult(request_id=request_id, status="failed", model=model, worker_id=worker_id, error=error)
        for held_in, position in zip(lists, positions, strict=True):
            if position is not None and await finish(redis, held_in, ended, ttl_s, streamed=streamed):
                log.info("request %s ended: %s", request_id, error.code)
                return ended
    return None


async def lookup(redis: RedisClient, request_id: str) -> JobResult | JobStatus | None:
    """The result if it exists, else the job's status, else None (unknown id), read atomically."""
    found = await _LOOKUP.run(
        redis,
        _LookupKeys(result=keys.result_key(request_id), job=keys.job_key(request_id)),
        _LookupArgs(fields=_STATUS_FIELDS),
    )
    if found[0] is not None:
        return JobResult.model_validate_json(found[0])
    status, worker_id, model, stream = (
        value.decode() if isinstance(value, bytes) else value for value in found[1:]
    )  # fmt: skip
    if status is not None:
        return JobStatus(
            request_id=request_id, status=status, worker_id=worker_id or None, model=model, stream=stream == "1"
        )
    return None
