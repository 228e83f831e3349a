"""Admission: choose a worker for a request and enqueue it. No HTTP here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
import weakref
from collections import Counter
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent import keys, logs, queue, registry, replication, routing
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator import metrics, overhead, quotas
from gputorrent.coordinator.security import Caller, owns
from gputorrent.errors import Conflict, ModelNotFound, NoWorkersAvailable, RateLimited
from gputorrent.protocol import Accepted, EmbeddingRequest, InferenceRequest, Job, WorkerState

log = logging.getLogger(__name__)

ROUTE_ATTEMPTS = 3  # a job whose chosen worker left just then is routed again, this many times at most

QUEUE_FULL_RETRY_AFTER_S = 1  # a full queue drains by a job per slot per job time: try again soon

# Admission routes on a snapshot of the pool: one read of Redis serves every request of a moment
# instead of each reading it. A snapshot older than SNAPSHOT_MAX_AGE_S is read again after the next
# admission, behind it, so requests coming less often than that do not each wait for the read;
# one older than SNAPSHOT_STALE_MAX_S (after a quiet spell) is read before routing. Liveness is
# checked again when the job is queued, and a request with no live candidate reads the pool
# afresh before it is refused.
SNAPSHOT_MAX_AGE_S = 0.1
SNAPSHOT_STALE_MAX_S = 1.0


class PoolSnapshot:
    """The pool as admission last read it, with the jobs this coordinator queued since added to
    the queues they went to until their results are announced (so a burst of requests spreads as
    if each had read the pool, and a session's next request finds its worker as free as it is)."""

    def __init__(self) -> None:
        self._read: list[WorkerState] = []
        self._read_at = -math.inf
        self._pending: dict[str, str] = {}  # request id -> worker id: queued since the read, no result heard yet
        self._view: list[WorkerState] | None = None  # the read with the pending jobs added, built when asked
        self._rereading: asyncio.Task[None] | None = None

    async def workers(self, redis: Redis, *, fresh: bool = False) -> list[WorkerState]:
        if fresh or asyncio.get_running_loop().time() - self._read_at > SNAPSHOT_STALE_MAX_S:
            await self._reread(redis)
        if self._view is None:
            pending = Counter(self._pending.values())
            self._view = [
                w.model_copy(update={"queue_length": w.queue_length + pending[w.worker_id]})
                if pending[w.worker_id]
                else w
                for w in self._read
            ]
        return self._view

    def queued(self, redis: Redis, request_id: str, worker_id: str | None) -> None:
        """This coordinator queued the job for `worker_id` (None: on a shared queue). A snapshot past
        `SNAPSHOT_MAX_AGE_S` is read again now, off the admitted request's way, for the next one."""
        if worker_id is not None:
            self._pending[request_id] = worker_id
            self._view = None
        stale = asyncio.get_running_loop().time() - self._read_at > SNAPSHOT_MAX_AGE_S
        if stale and (self._rereading is None or self._rereading.done()):
            self._rereading = asyncio.create_task(self._reread_behind(redis), name="pool snapshot")

    async def close(self) -> None:
        """Stop a read in progress (the app is stopping)."""
        if self._rereading is not None and not self._rereading.done():
            self._rereading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rereading

    async def _reread(self, redis: Redis) -> None:
        counted = set(self._pending)  # jobs queued while the read is on its way may be missing from it
        read_at = asyncio.get_running_loop().time()
        self._read, self._read_at = await registry.snapshot(redis), read_at
        for request_id in counted:
            self._pending.pop(request_id, None)
        self._view = None

    async def _reread_behind(self, redis: Redis) -> None:
        try:
            await self._reread(redis)
        except (RedisError, OSError) as e:  # the next admission reads it (and reports the outage)
            log.debug("the pool snapshot could not be read behind an admission: %s", e)

    def announced(self, request_id: str) -> None:
        """The job's result was announced: if it was this coordinator's, it no longer weighs on its worker."""
        if self._pending.pop(request_id, None) is not None:
            self._view = None


# One per Redis client, which is one per coordinator app (a test's app does not see another's pool).
_snapshots: weakref.WeakKeyDictionary[Redis, PoolSnapshot] = weakref.WeakKeyDictionary()


def pool_snapshot(redis: Redis) -> PoolSnapshot:
    """The snapshot admission keeps for the app whose Redis client this is."""
    return _snapshots.setdefault(redis, PoolSnapshot())


def new_request_id() -> str:
    """An unguessable request id (122 random bits)."""
    return uuid.uuid4().hex


async def admit(
    redis: Redis,
    request: InferenceRequest | EmbeddingRequest,
    settings: CoordinatorSettings,
    caller: Caller,
    idempotency_key: str | None = None,
) -> Accepted:
    """Route the request by the coordinator's policy (`GPUTORRENT_ROUTING`) among live workers serving
    its model, or onto the model's shared queue, and enqueue it at its priority.

    The job belongs to `caller`'s key. A request id the client chose, or an `Idempotency-Key`,
    seen before returns the job it admitted then (`replayed`), never a second one; keys are per
    caller, request ids are global (another caller's id is a `Conflict`).

    Raises:
        InvalidRequest: the prompt or `max_tokens` is larger than this coordinator takes.
        RateLimited: the caller's key used up its minute, or has all its streams open, or the queue the
            job would join (its worker's, or its model's across the pool) is full.
        NoWorkersAvailable: no live worker at all, or none alive among those serving the model.
        ModelNotFound: live workers exist but none serves the model (nothing is enqueued).
    """
    client_id = request.request_id if isinstance(request, InferenceRequest) else None
    if client_id is not None:
        # One namespace for both: a request id is the idempotency key of its own request.
        idempotency_key = f"request:{client_id}"
    elif idempotency_key is not None:
        idempotency_key = f"key:{caller.key_id}:{idempotency_key}"
    if idempotency_key is not None and (replayed := await _replay(redis, idempotency_key, caller)) is not None:
        return replayed
    limits = quotas.limits(caller, quotas.check_size(request, settings), settings)
    snapshot = pool_snapshot(redis)
    fresh = False
    for _ in range(ROUTE_ATTEMPTS):
        try:
            return await _route_and_enqueue(
                redis, snapshot, fresh, request, settings, caller, limits, client_id, idempotency_key
            )
        except queue.WorkerGone as gone:  # it left after the snapshot was read: read it again and route again
            log.info("worker %s left before the job was queued; routing again", gone)
            fresh = True
    raise NoWorkersAvailable("the workers chosen for this request kept leaving the pool; retry shortly")


async def _route_and_enqueue(
    redis: Redis,
    snapshot: PoolSnapshot,
    fresh: bool,
    request: InferenceRequest | EmbeddingRequest,
    settings: CoordinatorSettings,
    caller: Caller,
    limits: queue.Limits,
    client_id: str | None,
    idempotency_key: str | None,
) -> Accepted:
    workers = await snapshot.workers(redis, fresh=fresh)
    counter = await queue.next_round_robin(redis) if routing.needs_counter(settings.routing) else 1
    affinity_key = routing.affinity_key(request)
    route = routing.choose(settings.routing, request.model, workers, counter=counter, affinity_key=affinity_key)
    if route is None and not fresh:  # a worker may have joined since the snapshot: look again before refusing
        workers = await snapshot.workers(redis, fresh=True)
        route = routing.choose(settings.routing, request.model, workers, counter=counter, affinity_key=affinity_key)
    if route is None:
        raise _no_candidate_error(request.model, workers)
    metrics.note_model(request.model)  # a served model: a bounded label
    timeout_s = request.timeout_s or settings.request_timeout_s
    job = _job(client_id or new_request_id(), route.worker_id, request, timeout_s)
    logs.request_id.set(job.request_id)  # every later line of this request carries it
    limits = dataclasses.replace(
        limits,
        max_queued=0 if job.shared else settings.max_queue_per_worker,  # a shared queue is bounded as its model's
        max_model_queued=settings.max_queue_per_model,
        queued_at_model_workers=sum(w.queue_length for w in workers if request.model in w.models),
    )
    try:
        admitted = await queue.enqueue(
            redis, job, settings.result_ttl_s, idempotency_key, caller.key_id, limits, require_alive=True
        )
    except queue.Refused as refused:
        raise _refused(refused.limit, job, settings) from None
    except queue.AdmittedBefore:  # a retry of a request whose first admission was not acknowledged
        found = await queue.lookup(redis, job.request_id)
        worker_id = found.worker_id if found is not None else route.worker_id
        return Accepted(request_id=job.request_id, worker_id=worker_id or None, replayed=True)
    if admitted != job.request_id:  # a concurrent twin got in first
        return await _replay(redis, idempotency_key or "", caller) or Accepted(
            request_id=admitted, worker_id=route.worker_id
        )
    snapshot.queued(redis, job.request_id, route.worker_id)
    overhead.note_admitted(job.request_id)
    log.info("request %s queued model=%s worker=%s kind=%s priority=%d", job.request_id, job.model,
             route.worker_id or "(shared queue)", job.kind, job.priority)  # fmt: skip
    return Accepted(request_id=job.request_id, worker_id=route.worker_id)


def _refused(limit: queue.Refusal, job: Job, settings: CoordinatorSettings) -> RateLimited:
    if limit == "queue":
        return _queue_full(f"worker {job.worker_id}'s queue holds {settings.max_queue_per_worker} jobs, its limit")
    if limit == "model_queue":
        return _queue_full(f"model {job.model!r} has {settings.max_queue_per_model} jobs queued, its limit")
    return quotas.refused(limit, settings)


def _queue_full(why: str) -> RateLimited:
    return RateLimited(f"the queue is full: {why}; retry later", retry_after_s=QUEUE_FULL_RETRY_AFTER_S)


async def _replay(redis: Redis, idempotency_key: str, caller: Caller) -> Accepted | None:
    """The job an idempotency key admitted before, or None when the key is new (or its job expired).

    Raises:
        Conflict: the key is a request id that another caller's request has.
    """
    found_id = await redis.get(keys.idempotency_key(idempotency_key))
    if found_id is None:
        return None
    request_id = str(found_id)
    if not await owns(redis, caller, request_id):
        raise Conflict(f"request_id {request_id!r} is taken by another client; choose another")
    found = await queue.lookup(redis, request_id)
    if found is None:
        return None
    # The first admission's WAIT may have come short (a 503 the client now retries): answer 202 only
    # once the replicas have it.
    await replication.confirm(redis, "admission", request_id, keys.idempotency_key(idempotency_key))
    return Accepted(request_id=request_id, worker_id=found.worker_id or None, replayed=True)


def _job(request_id: str, worker_id: str | None, request: InferenceRequest | EmbeddingRequest, timeout_s: float) -> Job:
    now = time.time()
    common: dict[str, Any] = {
        "request_id": request_id, "worker_id": worker_id or "", "shared": worker_id is None, "model": request.model,
        "enqueued_at": now, "deadline": now + timeout_s, "priority": request.priority,
        "admission_ms": overhead.admission_ms(),
    }  # fmt: skip
    if isinstance(request, EmbeddingRequest):
        return Job(kind="embed", input=request.input, **common)
    return Job(
        prompt=request.prompt, messages=request.messages, options=request.options, stream=request.stream, **common
    )


def _no_candidate_error(model: str, workers: list[WorkerState]) -> NoWorkersAvailable | ModelNotFound:
    served = routing.served_models(workers)
    if not served:
        if workers:
            states = ", ".join(sorted({w.state for w in workers}))
            return NoWorkersAvailable(f"no worker is taking jobs now (the registered ones are {states}); retry shortly")
        return NoWorkersAvailable("no live worker is registered; start one with `gputorrent worker`")
    if any(model in w.models for w in workers):
        return NoWorkersAvailable(f"no live worker serves model {model!r}; the workers that serve it are down")
    return ModelNotFound(f"model {model!r} is not served by any live worker", available_models=served)
