"""What a worker may do with its own jobs, named by its id: shared by the worker's direct Redis link
and the coordinator's `/worker` routes (for workers without Redis credentials), so both run the
same lease-checked scripts of `queue` and `streams`.

Every function here acts only on the lists of `worker_id`: the coordinator passes the id of the
worker that proved its secret, never one a request body names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.client import Pipeline as SyncPipeline
from redis.cluster import ClusterPipeline as SyncClusterPipeline

from gputorrent import handoff, keys, queue, registry, routing
from gputorrent.protocol import BeatAnswer, Heartbeat, Job
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.scripts import Script

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _HeldKeys:
    held_in: str
    job: str


@dataclass(frozen=True)
class _HeldArgs:
    request_id: str
    job_field: str


# A script, not a transaction: one read on the hot path (redis-py's cluster client runs each command
# of a transaction on a thread of its own, blocking the event loop).
_HELD = Script(
    _HeldKeys,
    _HeldArgs,
    """
if not redis.call('LPOS', held_in, request_id) then return false end
return redis.call('HGET', job, job_field)
""",
)


async def held(redis: RedisClient, worker_id: str, request_id: str) -> Job | None:
    """The job `request_id` when the worker holds it (it is in the worker's processing list: its lease
    on the job); None when the worker holds no such job."""
    body = await _HELD.run(
        redis, _HeldKeys(held_in=keys.held_in(worker_id, request_id), job=keys.job_key(request_id)),
        _HeldArgs(request_id=request_id, job_field=queue.JOB_FIELD),
    )  # fmt: skip
    if body is None:
        return None
    try:
        return Job.model_validate_json(body)
    except ValidationError as e:  # a newer coordinator queued it: this one cannot act on it
        log.error("worker %s holds job %s, which this coordinator cannot read: %s", worker_id, request_id, e)
        return None


# A beat checked against a secret that is deleted meanwhile (revoked, or the worker left) must not
# bring the worker back to life: the heartbeat is written only while the secret is there.
@dataclass(frozen=True)
class _BeatKeys:
    heartbeat: str
    secret: str


@dataclass(frozen=True)
class _BeatArgs:
    beat: str
    ttl_ms: int


# Sent by its source (EVAL) within the beat's pipeline: a pipeline cannot load a script it lacks.
_BEAT = Script(
    _BeatKeys,
    _BeatArgs,
    """
if redis.call('EXISTS', secret) == 0 then return 0 end
redis.call('SET', heartbeat, beat, 'PX', ttl_ms)
return 1
""",
)


async def beat(
    redis: RedisClient, worker_id: str, heartbeat: Heartbeat, ttl_s: float, running: list[str]
) -> BeatAnswer | None:
    """Refresh the worker's liveness key while its secret exists; answer whether it should drain,
    and which of its `running` jobs it no longer holds or were ended (it stops them). None, and
    nothing written, when its secret is gone."""
    async with redis.pipeline(transaction=False) as pipe:
        numkeys, keys_and_args = _BEAT.call(
            _BeatKeys(heartbeat=keys.heartbeat_key(worker_id), secret=keys.worker_secret_key(worker_id)),
            _BeatArgs(beat=heartbeat.model_dump_json(), ttl_ms=int(ttl_s * 1000)),
        )
        pipe.eval(_BEAT.source, numkeys, *keys_and_args)
        pipe.exists(keys.drain_key(worker_id))
        lists = sorted({keys.held_in(worker_id, request_id) for request_id in running})  # its own, and any abroad
        for held_in in lists:
            pipe.lrange(held_in, 0, -1)
        for request_id in running:
            pipe.exists(keys.cancel_key(request_id))
        # On a cluster the swarm's epoch is read apart: it is in cell 0, whose primary may be out of reach
        # while the worker's is not, and a pipeline that cannot reach a node it names fails whole.
        epoch_apart = isinstance(redis, RedisCluster)
        if not epoch_apart:
            pipe.get(keys.swarm_epoch())
        written, drain, *replies = await pipe.execute()
    if not written:
        return None
    swarm_epoch = await _read_swarm_epoch(redis, worker_id) if epoch_apart else int(replies.pop() or 0)
    held_ids = {str(request_id) for held in replies[: len(lists)] for request_id in held}
    cancelled = replies[len(lists) :]
    ended = [rid for rid, gone in zip(running, cancelled, strict=True) if gone or rid not in held_ids]
    await renew_presence(redis, worker_id, running, ttl_s)
    return BeatAnswer(drain=bool(drain), ended=ended, swarm_epoch=swarm_epoch)


async def _read_swarm_epoch(redis: RedisClient, worker_id: str) -> int:
    """The swarm's epoch, or 0 when it cannot be read now."""
    try:
        return int(await redis.get(keys.swarm_epoch()) or 0)
    except REDIS_FAILURES as e:
        log.debug("worker %s: the swarm's epoch cannot be read this beat (%s)", worker_id, e)
        return 0


def queue_presence(
    pipe: Pipeline | ClusterPipeline | SyncPipeline | SyncClusterPipeline,
    worker_id: str,
    running: list[str],
    ttl_s: float,
) -> bool:
    """Add to `pipe` the renewal of the worker's presence (`heartbeat:` in that cell, with its heartbeat's
    TTL) in every other cell whose jobs it runs (taken from their shared queues): that cell's reapers
    judge the jobs it holds there by it. Whether it added any."""
    cells = {keys.cell_of(request_id) for request_id in running} - {keys.cell_of(worker_id)}
    for cell in cells:
        pipe.set(keys.heartbeat_key(worker_id, cell), "1", px=int(ttl_s * 1000))
    return bool(cells)


async def renew_presence(redis: RedisClient, worker_id: str, running: list[str], ttl_s: float) -> None:
    """`queue_presence`, sent."""
    async with redis.pipeline(transaction=False) as pipe:
        if queue_presence(pipe, worker_id, running, ttl_s):
            await pipe.execute()


async def add_pulled_model(redis: RedisClient, worker_id: str, job: Job, *, registered_at: float | None = None) -> bool:
    """Add the model of the pull job `job` to the worker's registration while the worker holds that job:
    a worker lists a model this way only when it was asked to pull it. False when `job` is not a pull
    job the worker holds, or the registration cannot take the model (see `registry.add_model`, and
    its `registered_at`)."""
    if job.kind != "pull" or await redis.lpos(keys.held_in(worker_id, job.request_id), job.request_id) is None:
        return False
    return await registry.add_model(redis, worker_id, job.model, registered_at=registered_at)


async def fail_over(
    redis: RedisClient, worker_id: str, job: Job, *, max_attempts: int, ttl_s: int, fence: str = ""
) -> bool:
    """Hand a job the worker's backend could not run to another live worker serving its model (counting
    an attempt). True when the job is no longer the worker's to finish (handed on, or its lease was
    lost meanwhile); False when it had its last attempt or no other worker can take it (a pull job is
    its worker's alone): the worker stores its failure. `fence`: the worker's lease on it (`Lease.fence`)."""
    if job.attempt >= max_attempts or job.kind == "pull":
        return False
    workers = [w for w in await registry.snapshot(redis) if w.worker_id != worker_id]
    if not routing.candidates_for(job.model, workers):
        return False
    job, candidates = routing.hand_on_candidates(job, workers)
    target = routing.pick_round_robin(candidates, await queue.next_round_robin(redis)) if candidates else None
    moved = await queue.retry_or_fail(
        redis, keys.held_in(worker_id, job.request_id), job, started=True, target=target,
        max_attempts=max_attempts, ttl_s=ttl_s, fence=fence,
    )  # fmt: skip
    if moved:
        log.info("request %s handed to %s: worker %s's backend is unavailable", job.request_id,
                 f"worker {target}" if target else "its model's shared queue", worker_id)  # fmt: skip
    return True


async def hand_on_own(redis: RedisClient, worker_id: str, *, held: bool, max_attempts: int, ttl_s: int) -> int:
    """Give every band of the worker's own queue (with `held`, its processing list instead) to other live
    workers, without counting an attempt; the shared queues need no hand-on. Returns how many moved."""
    sources = [keys.processing_key(worker_id)] if held else keys.worker_queue_keys(worker_id)
    async with redis.pipeline(transaction=False) as pipe:
        for source in sources:
            pipe.llen(source)
        lengths = await pipe.execute()
    if not any(lengths):
        return 0
    workers = [w for w in await registry.snapshot(redis) if w.worker_id != worker_id]
    handed = 0
    for source, length in zip(sources, lengths, strict=True):
        if length:
            handed += await handoff.hand_on(
                redis, worker_id, source, workers, count_attempt=False, max_attempts=max_attempts, ttl_s=ttl_s,
                only_if_dead=False,
            )  # fmt: skip
    return handed


async def reclaim_orphans(
    redis: RedisClient, worker_id: str, held: set[str], suspects: set[str], result_ttl_s: int, *,
    registered_at: float | None = None,
) -> tuple[int, set[str]]:  # fmt: skip
    """Queue again (at the front of the worker's queue) the jobs of its processing list that no consumer
    holds (`held`: request ids) and that were already unheld on the previous look (`suspects`): a take
    whose reply never reached the worker. Returns how many were queued again, and the unheld ones
    to look at next time. An unheld job that cannot be read fails with `result_ttl_s` (see `queue.held_jobs`)."""
    held_in = keys.processing_key(worker_id)
    unheld = {str(request_id) for request_id in await redis.lrange(held_in, 0, -1)} - held
    orphans = sorted(unheld & suspects)
    if orphans and await registry.registered_by_another(redis, worker_id, registered_at):
        # Another process registered this id: what its list holds is that one's (its beat stops this one).
        return 0, set()
    requeued = 0
    entries = list(zip(orphans, await queue.bodies(redis, orphans), strict=True))
    for job in await queue.held_jobs(redis, held_in, entries, worker_id, result_ttl_s):
        if await queue.requeue(redis, held_in, job):
            log.warning("request %s: its take's reply was lost; queued for worker %s again", job.request_id, worker_id)
            requeued += 1
    return requeued, unheld - suspects
