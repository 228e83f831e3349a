"""Admission: choose a worker for a request and enqueue it. No HTTP here."""

from __future__ import annotations

import logging
import time
import uuid

from redis.asyncio import Redis

from gputorrent import queue, registry, routing
from gputorrent.errors import ModelNotFound, NoWorkersAvailable
from gputorrent.protocol import Accepted, EmbeddingRequest, InferenceRequest, Job, WorkerState

log = logging.getLogger(__name__)


def new_request_id() -> str:
    """An unguessable request id (122 random bits)."""
    return uuid.uuid4().hex


async def admit(redis: Redis, request: InferenceRequest | EmbeddingRequest, result_ttl_s: int) -> Accepted:
    """Route the request round-robin among live workers serving its model and enqueue it.

    Raises:
        NoWorkersAvailable: no live worker at all, or none alive among those serving the model.
        ModelNotFound: live workers exist but none serves the model (nothing is enqueued).
    """
    workers = await registry.snapshot(redis)
    candidates = routing.candidates_for(request.model, workers)
    if not candidates:
        raise _no_candidate_error(request.model, workers)
    worker_id = routing.pick_round_robin(candidates, await queue.next_round_robin(redis))
    job = _job(new_request_id(), worker_id, request)
    await queue.enqueue(redis, job, result_ttl_s)
    log.info("request %s queued model=%s worker=%s kind=%s", job.request_id, job.model, worker_id, job.kind)
    return Accepted(request_id=job.request_id, worker_id=worker_id)


def _job(request_id: str, worker_id: str, request: InferenceRequest | EmbeddingRequest) -> Job:
    if isinstance(request, EmbeddingRequest):
        return Job(
            request_id=request_id,
            worker_id=worker_id,
            model=request.model,
            kind="embed",
            input=request.input,
            enqueued_at=time.time(),
        )
    return Job(
        request_id=request_id,
        worker_id=worker_id,
        model=request.model,
        prompt=request.prompt,
        messages=request.messages,
        options=request.options,
        enqueued_at=time.time(),
        stream=request.stream,
    )


def _no_candidate_error(model: str, workers: list[WorkerState]) -> NoWorkersAvailable | ModelNotFound:
    served = routing.served_models(workers)
    if not served:
        return NoWorkersAvailable("no live worker is registered; start one with `gputorrent worker`")
    if any(model in w.models for w in workers):
        return NoWorkersAvailable(f"no live worker serves model {model!r}; the workers that serve it are down")
    return ModelNotFound(f"model {model!r} is not served by any live worker", available_models=served)
