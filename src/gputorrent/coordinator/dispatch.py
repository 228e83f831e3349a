"""Admission: choose a worker for a request and enqueue it. No HTTP here."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any

from gputorrent import keys, logs, queue, replication, routing
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator import metrics, overhead, quotas
from gputorrent.coordinator.security import Caller, owns
from gputorrent.coordinator.snapshot import PoolSnapshot, pool_snapshot
from gputorrent.errors import Conflict, ModelNotFound, NoWorkersAvailable, RateLimited
from gputorrent.protocol import Accepted, EmbeddingRequest, InferenceRequest, Job, WorkerState
from gputorrent.redis_client import RedisClient

log = logging.getLogger(__name__)

ROUTE_ATTEMPTS = 3  # a job whose chosen worker left just then is routed again, this many times at most

QUEUE_FULL_RETRY_AFTER_S = 1  # a full queue drains by a job per slot per job time: try again soon


def new_request_id(cell: int = keys.HOME_CELL) -> str:
    """An unguessable request id (122 random bits) in `cell` (`keys.cell_of`): drawn again until it
    is, as many draws on average as there are cells."""
    while keys.cell_of(request_id := uuid.uuid4().hex) != cell:
        pass
    return request_id


async def admit(
    redis: RedisClient,
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
    named_cell = None  # a request that names itself is admitted in its name's cell, its idempotency record there
    if client_id is not None:
        # One namespace for both: a request id is the idempotency key of its own request.
        idempotency_key, named_cell = f"request:{client_id}", keys.cell_of(client_id)
    elif idempotency_key is not None:
        idempotency_key = f"key:{caller.key_id}:{idempotency_key}"
        named_cell = keys.cell_of(idempotency_key)
    seen = None
    if idempotency_key is not None and named_cell is not None:
        seen = await _seen(redis, idempotency_key, named_cell)
        if seen is not None and (replayed := await _replay(redis, idempotency_key, named_cell, seen, caller)):
            return replayed
    limits = quotas.limits(caller, quotas.check_size(request, settings), settings)
    snapshot = pool_snapshot(redis)
    for attempt in range(ROUTE_ATTEMPTS):
        try:
            return await _route_and_enqueue(
                redis, snapshot, request, settings, caller, limits, client_id, idempotency_key, named_cell, seen
            )
        except queue.WorkerGone as gone:  # it left after the snapshot was read: route again without it
            log.info("worker %s left before the job was queued; routing again", gone)
            snapshot.left(str(gone))
            if attempt > 0:  # a second one gone: the snapshot is out of date, not just a moment old
                await snapshot.for_routing(redis, fresh=True)
    raise NoWorkersAvailable("the workers chosen for this request kept leaving the pool; retry shortly")


async def _route_and_enqueue(
    redis: RedisClient,
    snapshot: PoolSnapshot,
    request: InferenceRequest | EmbeddingRequest,
    settings: CoordinatorSettings,
    caller: Caller,
    limits: queue.Limits,
    client_id: str | None,
    idempotency_key: str | None,
    named_cell: int | None,
    seen: str | None,
) -> Accepted:
    await snapshot.for_routing(redis)
    counter = await queue.next_round_robin(redis) if routing.needs_counter(settings.routing) else 1
    affinity_key = routing.affinity_key(request)
    route = snapshot.choose(
        settings.routing, request.model, counter=counter, affinity_key=affinity_key, cell=named_cell
    )
    if route is None:  # a worker may have joined since the snapshot: look again before refusing
        await snapshot.for_routing(redis, missed=True)
        route = snapshot.choose(
            settings.routing, request.model, counter=counter, affinity_key=affinity_key, cell=named_cell
        )
    if route is None:
        raise _no_candidate_error(request.model, snapshot.workers)
    metrics.note_model(request.model)  # a served model: a bounded label
    timeout_s = request.timeout_s or settings.request_timeout_s
    # The job's keys lie in one cell with the list it joins: its worker's, or a shared queue's.
    if named_cell is not None:
        cell = named_cell
    else:
        cell = keys.cell_of(route.worker_id) if route.worker_id else snapshot.shared_cell(request.model)
    job = _job(client_id or new_request_id(cell), route.worker_id, request, timeout_s)
    logs.request_id.set(job.request_id)  # every later line of this request carries it
    limits = dataclasses.replace(
        limits,
        max_queued=0 if job.shared else settings.max_queue_per_worker,  # a shared queue is bounded as its model's
        max_model_queued=settings.max_queue_per_model,
        queued_at_model_workers=snapshot.queued_for(request.model, but_cell=cell),
    )
    try:
        admitted = await queue.enqueue(
            redis, job, settings.result_ttl_s, idempotency_key, caller.key_id, limits, require_alive=True, seen=seen
        )
    except queue.Refused as refused:
        raise _refused(refused.limit, job, settings) from None
    except queue.AdmittedBefore:  # a retry of a request whose first admission was not acknowledged
        found = await queue.lookup(redis, job.request_id)
        worker_id = found.worker_id if found is not None else route.worker_id
        return Accepted(request_id=job.request_id, worker_id=worker_id or None, replayed=True)
    if admitted != job.request_id:  # a concurrent twin got in first
        return await _replay(redis, idempotency_key or "", cell, admitted, caller) or Accepted(
            request_id=admitted, worker_id=route.worker_id
        )
    snapshot.queued(redis, job.request_id, route.worker_id, job.model)
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


async def _seen(redis: RedisClient, idempotency_key: str, cell: int) -> str | None:
    """The request id an idempotency key (its record in `cell`) admitted before; None when the key is new."""
    found_id = await redis.get(keys.idempotency_key(idempotency_key, cell))
    return None if found_id is None else str(found_id)


async def _replay(
    redis: RedisClient, idempotency_key: str, cell: int, request_id: str, caller: Caller
) -> Accepted | None:
    """The job `request_id`, which an idempotency key admitted before, or None when its job and result
    are gone (expired: the key is free again).

    Raises:
        Conflict: the key is a request id that another caller's request has.
    """
    if not await owns(redis, caller, request_id):
        raise Conflict(f"request_id {request_id!r} is taken by another client; choose another")
    found = await queue.lookup(redis, request_id)
    if found is None:
        return None
    # The first admission's WAIT may have come short (a 503 the client now retries): answer 202 only
    # once the replicas have it.
    await replication.confirm(redis, "admission", request_id, keys.idempotency_key(idempotency_key, cell))
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
