"""Admission: choose a worker for a request and enqueue it. No HTTP here."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from gputorrent import keys, queue, registry, routing
from gputorrent.config import CoordinatorSettings
from gputorrent.errors import ModelNotFound, NoWorkersAvailable
from gputorrent.protocol import Accepted, EmbeddingRequest, InferenceRequest, Job, WorkerState

log = logging.getLogger(__name__)


def new_request_id() -> str:
    """An unguessable request id (122 random bits)."""
    return uuid.uuid4().hex


async def admit(
    redis: Redis,
    request: InferenceRequest | EmbeddingRequest,
    settings: CoordinatorSettings,
    idempotency_key: str | None = None,
) -> Accepted:
    """Route the request round-robin among live workers serving its model and enqueue it.

    A request id the client chose, or an `Idempotency-Key`, seen before returns the job it
    admitted then (`replayed`), never a second one.

    Raises:
        NoWorkersAvailable: no live worker at all, or none alive among those serving the model.
        ModelNotFound: live workers exist but none serves the model (nothing is enqueued).
    """
    client_id = request.request_id if isinstance(request, InferenceRequest) else None
    if client_id is not None:
        # One namespace for both: a request id is the idempotency key of its own request.
        idempotency_key = f"request:{client_id}"
    elif idempotency_key is not None:
        idempotency_key = f"key:{idempotency_key}"
    if idempotency_key is not None and (replayed := await _replay(redis, idempotency_key)) is not None:
        return replayed
    workers = await registry.snapshot(redis)
    candidates = routing.candidates_for(request.model, workers)
    if not candidates:
        raise _no_candidate_error(request.model, workers)
    worker_id = routing.pick_round_robin(candidates, await queue.next_round_robin(redis))
    timeout_s = request.timeout_s or settings.request_timeout_s
    job = _job(client_id or new_request_id(), worker_id, request, timeout_s)
    admitted = await queue.enqueue(redis, job, settings.result_ttl_s, idempotency_key)
    if admitted != job.request_id:  # a concurrent twin got in first
        return await _replay(redis, idempotency_key or "") or Accepted(request_id=admitted, worker_id=worker_id)
    log.info("request %s queued model=%s worker=%s kind=%s", job.request_id, job.model, worker_id, job.kind)
    return Accepted(request_id=job.request_id, worker_id=worker_id)


async def _replay(redis: Redis, idempotency_key: str) -> Accepted | None:
    """The job an idempotency key admitted before, or None when the key is new (or its job expired)."""
    found_id = await redis.get(keys.idempotency_key(idempotency_key))
    if found_id is None:
        return None
    request_id = str(found_id)
    found = await queue.lookup(redis, request_id)
    if found is None:
        return None
    return Accepted(request_id=request_id, worker_id=found.worker_id, replayed=True)


def _job(request_id: str, worker_id: str, request: InferenceRequest | EmbeddingRequest, timeout_s: float) -> Job:
    now = time.time()
    common: dict[str, Any] = {
        "request_id": request_id, "worker_id": worker_id, "model": request.model, "enqueued_at": now,
        "deadline": now + timeout_s,
    }  # fmt: skip
    if isinstance(request, EmbeddingRequest):
        return Job(kind="embed", input=request.input, **common)
    return Job(
        prompt=request.prompt, messages=request.messages, options=request.options, stream=request.stream, **common
    )


def _no_candidate_error(model: str, workers: list[WorkerState]) -> NoWorkersAvailable | ModelNotFound:
    served = routing.served_models(workers)
    if not served:
        return NoWorkersAvailable("no live worker is registered; start one with `gputorrent worker`")
    if any(model in w.models for w in workers):
        return NoWorkersAvailable(f"no live worker serves model {model!r}; the workers that serve it are down")
    return ModelNotFound(f"model {model!r} is not served by any live worker", available_models=served)
