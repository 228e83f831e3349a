"""Run one job on a backend and turn whatever happens into a `JobResult`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gputorrent.errors import BackendError, Cancelled, DeadlineExceeded, GPUTorrentError
from gputorrent.protocol import ErrorInfo, GenerationDone, Job, JobResult, Resumed, Timings, TokenChunk, Usage
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends import Backend, Puller

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "the request was ended while it ran (cancelled, timed out or its client left); generation stopped"
PULL_CANCELLED_MESSAGE = (
    "the pull was ended while it ran (cancelled, timed out or its client left); the download stopped "
    "(pulling again resumes it)"
)
# A backend constrains output to a format from its first token: after text it did not write, the
# constraint would start again and the whole would not match.
FORMAT_RESUME_MESSAGE = (
    "its worker failed mid-stream, and output constrained to a format (JSON) cannot be continued by another "
    "worker; retry the request"
)
DEADLINE_MESSAGE = "the request passed its deadline (timeout_s) before it finished"
RESUMED_EXACT = "its worker failed mid-stream; another continued from the tokens already sent (greedy: exact)"
RESUMED_SAMPLED = (
    "its worker failed mid-stream; another continued from the tokens already sent. At temperature above 0 "
    "the rest is a fresh sample, not what the first worker would have written"
)


async def execute(
    backend: Backend,
    job: Job,
    writer: StreamWriter | None = None,
    ended: asyncio.Event | None = None,
    *,
    taken_at: float | None = None,
) -> JobResult:
    """Run the job, streaming generated text to `writer` if given; a failure becomes a failed result.

    It stops at the next token once `ended` is set (the job was ended elsewhere) or the stream's
    reader went away, and at the job's deadline even between tokens (a backend that hangs).
    `taken_at` (unix time) is when the worker took the job: its time queued ends there.
    """
    started = time.time()
    waited = _Waited(job, taken_at or started, started, time.monotonic())
    try:
        async with _deadline(job):
            outcome = await _run(backend, job, writer, ended or asyncio.Event())
        first_token_at = outcome.pop("first_token_at", None)
    except GPUTorrentError as e:
        log.warning("request %s failed: %s: %s", job.request_id, e.code, e.message)
        return _failed(job, e.code, e.message, waited)
    except Exception:
        log.exception("request %s failed inside the worker", job.request_id)
        message = "the worker failed to run the job; its log has the cause"
        return _failed(job, "internal_error", message, waited)
    return JobResult(
        request_id=job.request_id,
        status="completed",
        model=job.model,
        worker_id=job.worker_id,
        timings=_timings(waited, first_token_at),
        **outcome,
    )


@contextlib.asynccontextmanager
async def _deadline(job: Job) -> AsyncIterator[None]:
    """Turn the job's deadline into `DeadlineExceeded`, wherever the work is when it passes."""
    if job.deadline is None:
        yield
        return
    timeout = asyncio.timeout_at(asyncio.get_running_loop().time() + (job.deadline - time.time()))
    try:
        async with timeout:
            yield
    except TimeoutError:
        if timeout.expired():  # ours, not a backend's own timeout passing through
            raise DeadlineExceeded(DEADLINE_MESSAGE) from None
        raise


async def _run(backend: Backend, job: Job, writer: StreamWriter | None, ended: asyncio.Event) -> dict[str, Any]:
    if job.kind == "embed":
        embeddings = await backend.embed(job)
        if not all(math.isfinite(x) for vector in embeddings.vectors for x in vector):
            raise BackendError("the backend returned an embedding with non-finite values")
        return {"embeddings": embeddings.vectors, "usage": Usage(prompt_tokens=embeddings.prompt_tokens)}
    if job.kind == "pull":
        await _pull(backend, job, writer, ended)
        return {}
    return await _generate(backend, job, writer, ended)


async def _pull(backend: Backend, job: Job, writer: StreamWriter | None, ended: asyncio.Event) -> None:
    """Fetch the job's model onto the backend, writing each progress line to `writer` as one line of
    JSON (the coordinator relays them, tagged with this worker)."""
    if not isinstance(backend, Puller):
        raise BackendError(f"the {backend.name} backend cannot pull models")
    progress = backend.pull(job.model, insecure=job.insecure)
    try:
        async for line in progress:
            if writer is not None:
                writer.push(line.model_dump_json(exclude_none=True) + "\n")
            if ended.is_set() or (writer is not None and writer.cancelled):
                raise Cancelled(PULL_CANCELLED_MESSAGE)
    finally:
        await progress.aclose()  # closes the connection to the backend at once when we leave early


async def _generate(backend: Backend, job: Job, writer: StreamWriter | None, ended: asyncio.Event) -> dict[str, Any]:
    """Generate, pushing each token to `writer`; a job with a `continuation` pushes only the new text."""
    if job.continuation and job.options.format is not None:
        raise BackendError(FORMAT_RESUME_MESSAGE)
    pieces: list[str] = [job.continuation] if job.continuation else []
    done: GenerationDone | None = None
    first_token_at: list[float] = []  # when the first token came (time.monotonic()), once it has
    if job.continuation and job.options.max_tokens <= job.continuation_tokens:  # the earlier attempt had it all
        done = GenerationDone(prompt_tokens=0, completion_tokens=0, finish_reason="length")
    else:
        done = await _tokens(backend, _remaining(job), writer, ended, pieces, first_token_at)
    outcome: dict[str, Any] = {
        "first_token_at": first_token_at[0] if first_token_at else None,
        "output": "".join(pieces),
        "finish_reason": done.finish_reason,
        "usage": Usage(
            prompt_tokens=max(0, done.prompt_tokens - job.continuation_tokens),
            completion_tokens=done.completion_tokens + job.continuation_tokens,
        ),
    }
    if job.continuation:
        exact = job.options.temperature == 0
        outcome["resumed"] = Resumed(
            after_tokens=job.continuation_tokens,
            exact=exact,
            note=RESUMED_EXACT if exact else RESUMED_SAMPLED,
        )
    return outcome


async def _tokens(
    backend: Backend,
    job: Job,
    writer: StreamWriter | None,
    ended: asyncio.Event,
    pieces: list[str],
    first_token_at: list[float],
) -> GenerationDone:
    done: GenerationDone | None = None
    generation = backend.generate(job)
    try:
        async for item in generation:
            if isinstance(item, TokenChunk):
                if not first_token_at:
                    first_token_at.append(time.monotonic())
                pieces.append(item.text)
                if writer is not None:
                    writer.push(item.text)
                if ended.is_set() or (writer is not None and writer.cancelled):
                    raise Cancelled(CANCELLED_MESSAGE)
            else:
                done = item
    finally:
        await generation.aclose()  # stops the backend at once when we leave early
    if done is None:
        raise GPUTorrentError("the backend ended without reporting completion")
    return done


def _remaining(job: Job) -> Job:
    """The job as the backend runs it: a continuation may only add the tokens the earlier attempt left."""
    if not job.continuation:
        return job
    options = job.options.model_copy(update={"max_tokens": job.options.max_tokens - job.continuation_tokens})
    return job.model_copy(update={"options": options})


@dataclass(frozen=True)
class _Waited:
    """A job's time before inference: queued until `taken`, then dispatched until `started` (unix times,
    comparable with the coordinator's); inference from `started_monotonic`, immune to clock steps."""

    job: Job
    taken: float
    started: float
    started_monotonic: float


def _timings(waited: _Waited, first_token_at: float | None = None) -> Timings:
    started = waited.started_monotonic
    first_token_ms = round((first_token_at - started) * 1000, 3) if first_token_at is not None else None
    return Timings(
        admission_ms=waited.job.admission_ms,
        # Coordinator and worker clocks: a skew between machines shows here (never below 0).
        queued_ms=round(max(0.0, (waited.taken - waited.job.enqueued_at) * 1000), 3),
        dispatch_ms=round(max(0.0, (waited.started - waited.taken) * 1000), 3),
        inference_ms=round((time.monotonic() - started) * 1000, 3),
        first_token_ms=first_token_ms,
    )


def _failed(job: Job, code: str, message: str, waited: _Waited) -> JobResult:
    return JobResult(
        request_id=job.request_id,
        status="failed",
        model=job.model,
        worker_id=job.worker_id,
        error=ErrorInfo(code=code, message=message),
        timings=_timings(waited),
    )
