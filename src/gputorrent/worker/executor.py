"""Run one job on a backend and turn whatever happens into a `JobResult`."""

from __future__ import annotations

import logging
import time

from gputorrent.errors import GPUTorrentError
from gputorrent.protocol import ErrorInfo, GenerationDone, Job, JobResult, Timings, TokenChunk, Usage
from gputorrent.worker.backends import Backend

log = logging.getLogger(__name__)


async def execute(backend: Backend, job: Job) -> JobResult:
    """Generate the job's output; a failure becomes a failed result, never an exception."""
    started = time.time()
    queued_ms = max(0.0, (started - job.enqueued_at) * 1000)
    pieces: list[str] = []
    done: GenerationDone | None = None
    try:
        async for item in backend.generate(job):
            if isinstance(item, TokenChunk):
                pieces.append(item.text)
            else:
                done = item
        if done is None:
            raise GPUTorrentError("the backend ended without reporting completion")
    except GPUTorrentError as e:
        log.warning("request %s failed: %s: %s", job.request_id, e.code, e.message)
        return _failed(job, e.code, e.message, queued_ms, started)
    except Exception:
        log.exception("request %s failed inside the worker", job.request_id)
        return _failed(
            job, "internal_error", "the worker failed to run the job; its log has the cause", queued_ms, started
        )
    return JobResult(
        request_id=job.request_id,
        status="completed",
        model=job.model,
        worker_id=job.worker_id,
        output="".join(pieces),
        finish_reason=done.finish_reason,
        usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens),
        timings=Timings(queued_ms=round(queued_ms, 3), inference_ms=round((time.time() - started) * 1000, 3)),
    )


def _failed(job: Job, code: str, message: str, queued_ms: float, started: float) -> JobResult:
    return JobResult(
        request_id=job.request_id,
        status="failed",
        model=job.model,
        worker_id=job.worker_id,
        error=ErrorInfo(code=code, message=message),
        timings=Timings(queued_ms=round(queued_ms, 3), inference_ms=round((time.time() - started) * 1000, 3)),
    )
