"""`/worker/...`: the pool's state for workers that hold no Redis credentials (`GPUTORRENT_LINK=coordinator`).

Every route needs the worker's own credential, `Authorization: Bearer <worker_id>:<worker_secret>`
(the secret `POST /register` gave it), checked against the hash in `worker_secret:{worker_id}`.
The worker id is taken from that credential, never from a body, and every write goes through
the same lease-checked scripts a Redis-linked worker runs (`leases`, `queue`, `streams`), so a
worker can take, stream to and finish only the jobs leased to it: anything else is 409 `lease_lost`.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response

from gputorrent import auth, keys, leases, pool_stats, queue, registry, replication, streams
from gputorrent.coordinator.deps import RedisDep, SettingsDep
from gputorrent.coordinator.snapshot import pool_snapshot
from gputorrent.errors import Conflict, InvalidRequest, LeaseLost, SlotsFull, Unauthorized, WorkerGone
from gputorrent.protocol import (
    REQUEST_ID_PATTERN,
    WORKER_ID_PATTERN,
    BeatAnswer,
    Group,
    HandOn,
    Job,
    JobResult,
    Left,
    Moved,
    OrphanCheck,
    Orphans,
    StreamText,
    Taken,
    WorkerBeat,
    WorkerRecord,
)

router = APIRouter(prefix="/worker", tags=["worker link"])

TAKE_WAIT_MAX_S = 5.0  # a take's long poll holds one of the coordinator's Redis connections
TAKE_WAIT_MIN_S = 0.01
_WORKER_ID = re.compile(WORKER_ID_PATTERN)
LEASE_LOST: dict[int | str, dict[str, Any]] = {
    409: {"description": "`lease_lost`: the job is not leased to this worker (ended, handed on, another's)"}
}


async def _worker_id(
    redis: RedisDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> str:
    """The id of the worker whose secret the request carries."""
    scheme, _, value = (authorization or "").partition(" ")
    worker_id, _, secret = value.strip().rpartition(":")
    if scheme.lower() != "bearer" or not secret or not _WORKER_ID.match(worker_id):
        raise Unauthorized("a worker credential is required: `Authorization: Bearer <worker_id>:<worker_secret>`")
    stored = await redis.get(keys.worker_secret_key(worker_id))
    if stored is None or not hmac.compare_digest(str(stored), auth.hash_secret(secret)):
        raise Unauthorized("the worker credential is not valid (unknown worker, or not its secret)")
    return worker_id


WorkerDep = Annotated[str, Depends(_worker_id)]
RequestIdPath = Annotated[str, Path(pattern=REQUEST_ID_PATTERN)]


@dataclass(frozen=True)
class Held:
    """A job the calling worker holds (its request id is in the worker's processing list)."""

    worker_id: str
    job: Job


async def _held(request_id: RequestIdPath, worker_id: WorkerDep, redis: RedisDep) -> Held:
    job = await leases.held(redis, worker_id, request_id)
    if job is None:
        raise LeaseLost(f"job {request_id!r} is not leased to this worker")
    return Held(worker_id=worker_id, job=job)


HeldDep = Annotated[Held, Depends(_held)]


@router.post("/heartbeat", response_model=BeatAnswer)
async def heartbeat(body: WorkerBeat, worker_id: WorkerDep, redis: RedisDep, settings: SettingsDep) -> BeatAnswer:
    """Keep the worker alive (and show its load, condition and telemetry); the answer says whether an
    admin asked it to drain, and which of the jobs it says it runs were ended elsewhere.

    Its speed is believed up to `GPUTORRENT_MAX_WORKER_TOKENS_PER_S` only."""
    heartbeat = body.heartbeat
    if heartbeat.tokens_per_s is not None and heartbeat.tokens_per_s > settings.max_worker_tokens_per_s:
        heartbeat = heartbeat.model_copy(update={"tokens_per_s": settings.max_worker_tokens_per_s})
    answer = await leases.beat(redis, worker_id, heartbeat, settings.heartbeat_timeout_s, body.running)
    if answer is None:  # revoked (or left) after its credential was checked
        raise Unauthorized("the worker credential is not valid (unknown worker, or not its secret)")
    return answer


@router.post("/recover", response_model=Moved)
async def recover(worker_id: WorkerDep, redis: RedisDep, settings: SettingsDep) -> Moved:
    """At start: queue again (counting an attempt) what a previous run of this worker id left unfinished."""
    return Moved(jobs=await queue.recover(redis, worker_id, settings.max_attempts, settings.result_ttl_s))


class TakesInFlight:
    """The takes each worker has in flight on this coordinator: each long poll holds one of its
    Redis connections, so a worker gets at most as many as its registered slots."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}

    def count(self, worker_id: str) -> int:
        return self._count.get(worker_id, 0)

    @contextlib.contextmanager
    def hold(self, worker_id: str) -> Iterator[int]:
        """Count one more take of the worker while the block runs; yields how many others it has."""
        others = self.count(worker_id)
        self._count[worker_id] = others + 1
        try:
            yield others
        finally:
            if self._count[worker_id] == 1:
                del self._count[worker_id]
            else:
                self._count[worker_id] -= 1


def _takes_in_flight(request: Request) -> TakesInFlight:
    takes: TakesInFlight | None = getattr(request.app.state, "worker_takes", None)
    if takes is None:  # one per app, made on first use (no await in between: no race on the loop)
        takes = request.app.state.worker_takes = TakesInFlight()
    return takes


@router.post(
    "/take",
    response_model=Taken,
    responses={
        204: {"description": "no job came within `wait_s`"},
        410: {"description": "`worker_gone`: this worker is no longer registered (register again)"},
        429: {"description": "`slots_full`: the jobs it holds and the takes it has in flight fill its slots"},
    },
)
async def take(
    worker_id: WorkerDep,
    redis: RedisDep,
    settings: SettingsDep,
    takes: Annotated[TakesInFlight, Depends(_takes_in_flight)],
    wait_s: Annotated[float, Query(ge=0, le=TAKE_WAIT_MAX_S, allow_inf_nan=False, description="long poll")] = 1.0,
) -> Response:
    """Lease the next job for this worker: its own queue, or the shared queues of the models it registered.

    A worker holds at most its registered `slots` jobs, counting the takes it has in flight here: one
    credential can neither hoard a model's shared queue (and read its prompts) nor pin the
    coordinator's Redis connections with long polls.
    """
    # Counted before the reads below, so two concurrent takes each see the other.
    with takes.hold(worker_id) as others:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.worker_key(worker_id))
            pipe.llen(keys.processing_key(worker_id))
            record, held = await pipe.execute()
        if record is None:
            raise WorkerGone("this worker is no longer registered (it left, or was removed): register again")
        registered = WorkerRecord.model_validate_json(record)
        if held + others >= registered.slots:
            raise SlotsFull(
                f"this worker holds {held} jobs and has {others} takes in flight: its {registered.slots} slots "
                "are full; finish a job first",
                retry_after_s=1,
            )
        # Never 0: a BLPOP timeout of 0 blocks for ever.
        wait_s = max(TAKE_WAIT_MIN_S, min(wait_s, settings.max_result_wait_s))
        lease = await queue.pop(
            redis, worker_id, wait_s, registered.models, result_ttl_s=settings.result_ttl_s,
            presence_ttl_s=settings.heartbeat_timeout_s,
        )  # fmt: skip
    if lease is None:
        return Response(status_code=204)
    taken = Taken(job=lease.job, streamed_before=lease.streamed_before)
    return Response(taken.model_dump_json(), media_type="application/json")


@router.get("/jobs/{request_id}/stream", response_model=StreamText, responses=LEASE_LOST)
async def sent_so_far(held: HeldDep, redis: RedisDep) -> StreamText:
    """The text an earlier attempt of the held job already streamed: the worker continues after it."""
    text, tokens = await streams.sent_so_far(redis, held.job.request_id)
    return StreamText(text=text, tokens=tokens)


@router.post("/jobs/{request_id}/stream", status_code=204, response_class=Response, responses=LEASE_LOST)
async def append(
    request_id: RequestIdPath, body: StreamText, worker_id: WorkerDep, redis: RedisDep, settings: SettingsDep
) -> None:
    """Append text to the job's token stream, if the job is this worker's and was not ended (checked
    in the append script itself, so this costs one round trip per batch)."""
    if not await streams.append(redis, request_id, worker_id, body.text, body.tokens, settings.result_ttl_s):
        raise LeaseLost(f"job {request_id!r} is not leased to this worker, or was ended")


@router.post("/jobs/{request_id}/result", status_code=204, response_class=Response, responses=LEASE_LOST)
async def finish(
    request_id: RequestIdPath, body: JobResult, worker_id: WorkerDep, redis: RedisDep, settings: SettingsDep
) -> None:
    """Store the held job's result (and end its stream), atomically with giving up the lease.

    The result is stored as this worker's, for the held job's model. A repeat of a call whose
    answer was lost finds the same result stored by this worker and answers 204 again.
    """
    if body.request_id != request_id:
        raise InvalidRequest("the result's request_id is not the job's")
    job = await leases.held(redis, worker_id, request_id)
    if job is None:
        if await _already_stored(redis, body, worker_id):
            return
        raise LeaseLost(f"job {request_id!r} is not leased to this worker")
    result = body.model_copy(update={"worker_id": worker_id, "model": job.model})
    held_in = keys.held_in(worker_id, request_id)
    if not await queue.finish(redis, held_in, result, settings.result_ttl_s, streamed=job.stream):
        raise LeaseLost(f"job {request_id!r} is not leased to this worker")
    # The pool's history counts what was stored, not what a worker says it did.
    await pool_stats.add(redis, pool_stats.job_delta(job, result, worker_id, time.time()))


async def _already_stored(redis: RedisDep, result: JobResult, worker_id: str) -> bool:
    stored = await redis.get(keys.result_key(result.request_id))
    if stored is None or JobResult.model_validate_json(stored) != result.model_copy(update={"worker_id": worker_id}):
        return False
    # The first call's WAIT may have come short: acknowledge the repeat only once the replicas have it.
    await replication.confirm(redis, "result", result.request_id, keys.result_key(result.request_id))
    return True


@router.post("/jobs/{request_id}/pulled", status_code=204, response_class=Response, responses=LEASE_LOST)
async def pulled(held: HeldDep, redis: RedisDep) -> None:
    """The held pull job fetched its model: add it to this worker's registered models (routing and the
    model listings see it), before the worker stores the pull's result.

    Only the model of a pull job leased to this worker: a worker cannot list a model nobody asked
    it to pull. 409 (`conflict`) when the job is not a pull, or the registration cannot take the model.
    """
    if held.job.kind != "pull":
        raise Conflict(f"job {held.job.request_id!r} is not a pull")
    if not await leases.add_pulled_model(redis, held.worker_id, held.job):
        raise Conflict(f"model {held.job.model!r} cannot be listed: this worker's registration is gone or full")
    pool_snapshot(redis).joined()


@router.post("/group", status_code=204, response_class=Response)
async def set_group(body: Group, worker_id: WorkerDep, redis: RedisDep) -> None:
    """Where this worker's split model lies now (its group re-formed on other shard hosts); 410 when it
    is no longer registered."""
    if not await registry.set_group(redis, worker_id, body):
        raise WorkerGone(f"worker {worker_id!r} is not registered")


@router.post("/jobs/{request_id}/fail-over", response_model=Moved, responses=LEASE_LOST)
async def fail_over(held: HeldDep, redis: RedisDep, settings: SettingsDep) -> Moved:
    """The worker's backend cannot run the held job: hand it to another live worker (counting an attempt).

    `jobs` is 1 when the job is no longer this worker's to finish, 0 when it had its last attempt or
    no other worker serves its model (the worker then stores its failure).
    """
    handed = await leases.fail_over(
        redis, held.worker_id, held.job, max_attempts=settings.max_attempts, ttl_s=settings.result_ttl_s
    )
    return Moved(jobs=int(handed))


@router.post("/hand-on", response_model=Moved)
async def hand_on(body: HandOn, worker_id: WorkerDep, redis: RedisDep, settings: SettingsDep) -> Moved:
    """Give this worker's queue (with `held`, the jobs it holds) to other live workers: it drains or is unhealthy."""
    handed = await leases.hand_on_own(
        redis, worker_id, held=body.held, max_attempts=settings.max_attempts, ttl_s=settings.result_ttl_s
    )
    return Moved(jobs=handed)


@router.post("/orphans", response_model=OrphanCheck)
async def orphans(body: Orphans, worker_id: WorkerDep, redis: RedisDep, settings: SettingsDep) -> OrphanCheck:
    """Queue again the jobs this worker holds in Redis that none of its consumers has, two looks in a
    row: a take whose answer never reached it."""
    requeued, suspects = await leases.reclaim_orphans(
        redis, worker_id, set(body.held), set(body.suspects), settings.result_ttl_s
    )
    return OrphanCheck(jobs=requeued, suspects=sorted(suspects))


@router.post("/leave", response_model=Left)
async def leave(worker_id: WorkerDep, redis: RedisDep) -> Left:
    """Leave the pool: out of the registry when the worker's lists are empty, else only marked gone.

    Once out of the registry its secret goes too: the id is free, and the old credential opens nothing."""
    left = await registry.deregister(redis, worker_id)
    if left:
        await redis.delete(keys.worker_secret_key(worker_id))
    return Left(left=left)
