"""Run one job on a backend and turn whatever happens into a `JobResult`."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from gputorrent.errors import BackendError, Cancelled, GPUTorrentError
from gputorrent.protocol import ErrorInfo, GenerationDone, Job, JobResult, Timings, TokenChunk, Usage
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends import Backend

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "the request was cancelled (its client left or its stream timed out); generation stopped"


async def execute(backend: Backend, job: Job, writer: StreamWriter | None = None) -> JobResult:
    """Run the job, streaming generated text to `writer` if given; a failure becomes a failed result."""
    started = time.time()
    queued_ms = max(0.0, (started - job.enqueued_at) * 1000)
    try:
        if job.kind == "embed":
            embeddings = await backend.embed(job)
            if not all(math.isfinite(x) for vector in embeddings.vectors for x in vector):
                raise BackendError("the backend returned an embedding with non-finite values")
            outcome: dict[str, Any] = {
                "embeddings": embeddings.vectors,
                "usage": Usage(prompt_tokens=embeddings.prompt_tokens),
            }
        else:
            outcome = await _generate(backend, job, writer)
    except GPUTorrentError as e:
        log.warning("request %s failed: %s: %s", job.request_id, e.code, e.message)
        return _failed(job, e.code, e.message, queued_ms, started)
    except Exception:
        log.exception("request %s failed inside the worker", job.request_id)
        message = "the worker failed to run the job; its log has the cause"
        return _failed(job, "internal_error", message, queued_ms, started)
    return JobResult(
        request_id=job.request_id,
        status="completed",
        model=job.model,
        worker_id=job.worker_id,
        timings=_timings(queued_ms, started),
        **outcome,
    )


async def _generate(backend: Backend, job: Job, writer: StreamWriter | None) -> dict[str, Any]:
    pieces: list[str] = []
    done: GenerationDone | None = None
    generation = backend.generate(job)
    try:
        async for item in generation:
            if isinstance(item, TokenChunk):
                pieces.append(item.text)
                if writer is not None:
                    writer.push(item.text)
                    if writer.cancelled:
                        raise Cancelled(CANCELLED_MESSAGE)
            else:
                done = item
    finally:
        await generation.aclose()  # stops the backend at once when we leave early
    if done is None:
        raise GPUTorrentError("the backend ended without reporting completion")
    return {
        "output": "".join(pieces),
        "finish_reason": done.finish_reason,
        "usage": Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens),
    }


def _timings(queued_ms: float, started: float) -> Timings:
    return Timings(queued_ms=round(queued_ms, 3), inference_ms=round((time.time() - started) * 1000, 3))


def _failed(job: Job, code: str, message: str, queued_ms: float, started: float) -> JobResult:
    return JobResult(
        request_id=job.request_id,
        status="failed",
        model=job.model,
        worker_id=job.worker_id,
        error=ErrorInfo(code=code, message=message),
        timings=_timings(queued_ms, started),
    )
