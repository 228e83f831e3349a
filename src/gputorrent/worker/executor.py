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
from gputorrent.protocol import ErrorInfo, GenerationDone, Job, JobResult, Resumed, Timings, Usage
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends import Backend, puller

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
RESUMED_REPLAYED = (
    "its worker failed mid-stream; another ran the request again, checked that it wrote the text already sent, "
    "and went on: the text is what one uninterrupted run gives"
)
RESUMED_ALL_SENT = "its worker failed after sending the whole answer; the text is that worker's own"
_CONTINUED = (
    "its worker failed mid-stream; another continued from the text already sent, read as part of the prompt, "
    "so the rest may differ from what the first worker would have written"
)
RESUMED_SAMPLED = f"{_CONTINUED} (at temperature above 0 without a seed a request has no single answer)"
RESUMED_NO_REPLAY = f"{_CONTINUED} (this backend does not reproduce a request exactly)"
RESUMED_TOO_LONG = f"{_CONTINUED} (more text was sent than the worker replays; GPUTORRENT_RESUME_REPLAY_MAX_TOKENS)"
RESUMED_DIVERGED = f"{_CONTINUED} (the new worker's run of the request differed from the text already sent)"


async def execute(
    backend: Backend,
    job: Job,
    writer: StreamWriter | None = None,
    ended: asyncio.Event | None = None,
    *,
    taken_at: float | None = None,
    replay_max_tokens: int = 0,
) -> JobResult:
    """Run the job, streaming generated text to `writer` if given; a failure becomes a failed result.

    It stops at the next token once `ended` is set (the job was ended elsewhere) or the stream's
    reader went away, and at the job's deadline even between tokens (a backend that hangs).
    `taken_at` (unix time) is when the worker took the job: its time queued ends there. A job that
    continues a stream is run again from its start when an earlier attempt sent at most
    `replay_max_tokens` tokens (see `_generate`).
    """
    started = time.time()
    waited = _Waited(job, taken_at or started, started, time.monotonic())
    try:
        async with _deadline(job):
            outcome = await _run(backend, job, writer, ended or asyncio.Event(), replay_max_tokens)
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


async def _run(
    backend: Backend, job: Job, writer: StreamWriter | None, ended: asyncio.Event, replay_max_tokens: int
) -> dict[str, Any]:
    if job.kind == "embed":
        embeddings = await backend.embed(job)
        if not all(math.isfinite(x) for vector in embeddings.vectors for x in vector):
            raise BackendError("the backend returned an embedding with non-finite values")
        return {"embeddings": embeddings.vectors, "usage": Usage(prompt_tokens=embeddings.prompt_tokens)}
    if job.kind == "pull":
        await _pull(backend, job, writer, ended)
        return {}
    return await _generate(backend, job, writer, ended, replay_max_tokens)


async def _pull(backend: Backend, job: Job, writer: StreamWriter | None, ended: asyncio.Event) -> None:
    """Fetch the job's model onto the backend, writing each progress line to `writer` as one line of
    JSON (the coordinator relays them, tagged with this worker)."""
    if (pulling := puller(backend)) is None:
        raise BackendError(f"the {backend.name} backend cannot pull models")
    progress = pulling.pull(job.model, insecure=job.insecure)
    try:
        async for line in progress:
            if writer is not None:
                writer.push(line.model_dump_json(exclude_none=True) + "\n")
            if ended.is_set() or (writer is not None and writer.cancelled):
                raise Cancelled(PULL_CANCELLED_MESSAGE)
    finally:
        await progress.aclose()  # closes the connection to the backend at once when we leave early


async def _generate(
    backend: Backend, job: Job, writer: StreamWriter | None, ended: asyncio.Event, replay_max_tokens: int
) -> dict[str, Any]:
    """Generate, pushing each token to `writer`; a job with a `continuation` pushes only the new text.

    A continuation is exact only when checked: a reproducible request (greedy or seeded) on a
    backend that reproduces it is run again from its start, and its text must begin with the text
    already sent; then the rest is what one uninterrupted run writes. Otherwise (a sampled request,
    a backend that cannot replay, more than `replay_max_tokens` sent, or a replay that differs) the
    text sent is read as part of the prompt and the result says `exact: false`.
    """
    if not job.continuation:
        return await _complete(backend, job, writer, ended, pieces=[])
    if job.options.format is not None:
        raise BackendError(FORMAT_RESUME_MESSAGE)
    if job.options.max_tokens <= job.continuation_tokens:  # the earlier attempt sent it all
        done = GenerationDone(prompt_tokens=0, completion_tokens=job.continuation_tokens, finish_reason="length")
        return {**_outcome(job.continuation, done, None), "resumed": _resumed(job, True, RESUMED_ALL_SENT)}
    if not job.options.reproducible:
        note = RESUMED_SAMPLED
    elif not backend.replays_exactly:
        note = RESUMED_NO_REPLAY
    elif job.continuation_tokens > replay_max_tokens:
        note = RESUMED_TOO_LONG
    else:
        replay = job.model_copy(update={"continuation": None, "continuation_tokens": 0})
        try:
            outcome = await _complete(backend, replay, writer, ended, pieces=[], sent=job.continuation)
        except _Diverged as e:
            log.warning("request %s: its replay differed from the text sent after %d characters; continuing "
                        "from that text", job.request_id, e.matched)  # fmt: skip
            note = RESUMED_DIVERGED
        else:
            return {**outcome, "resumed": _resumed(job, True, RESUMED_REPLAYED)}
    continued = job.options.model_copy(update={"max_tokens": job.options.max_tokens - job.continuation_tokens})
    outcome = await _complete(backend, job.model_copy(update={"options": continued}), writer, ended,
                              pieces=[job.continuation])  # fmt: skip
    usage = outcome["usage"]
    outcome["usage"] = Usage(
        prompt_tokens=max(0, usage.prompt_tokens - job.continuation_tokens),
        completion_tokens=usage.completion_tokens + job.continuation_tokens,
    )
    return {**outcome, "resumed": _resumed(job, False, note)}


def _resumed(job: Job, exact: bool, note: str) -> Resumed:
    return Resumed(after_tokens=job.continuation_tokens, exact=exact, note=note)


def _outcome(output: str, done: GenerationDone, first_token_at: float | None) -> dict[str, Any]:
    return {
        "first_token_at": first_token_at,
        "output": output,
        "finish_reason": done.finish_reason,
        "usage": Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens),
    }


class _Diverged(Exception):
    """A replay's text left the text already sent, after `matched` characters of it."""

    def __init__(self, matched: int) -> None:
        super().__init__(matched)
        self.matched = matched


async def _complete(
    backend: Backend,
    job: Job,
    writer: StreamWriter | None,
    ended: asyncio.Event,
    *,
    pieces: list[str],
    sent: str = "",
) -> dict[str, Any]:
    """Run the job on the backend to its end, after the text in `pieces`; the outcome's fields.

    With `sent`, the run is a replay of a request whose earlier attempt streamed `sent`: that much
    of its text is checked against `sent` and not pushed again, and `_Diverged` is raised where
    it differs (or where the run ends before it).
    """
    first_token_at: float | None = None
    matched = 0  # characters of `sent` the replay has written so far
    done: GenerationDone | None = None
    generation = backend.generate(job)
    try:
        async for item in generation:
            if isinstance(item, GenerationDone):
                done = item
                continue
            text = item.text
            if matched < len(sent):
                overlap = min(len(text), len(sent) - matched)
                if text[:overlap] != sent[matched : matched + overlap]:
                    raise _Diverged(matched)
                matched += overlap
                text = text[overlap:]
            if text:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                pieces.append(text)
                if writer is not None:
                    writer.push(text)
            if ended.is_set() or (writer is not None and writer.cancelled):
                raise Cancelled(CANCELLED_MESSAGE)
    finally:
        await generation.aclose()  # stops the backend at once when we leave early
    if done is None:
        raise GPUTorrentError("the backend ended without reporting completion")
    if matched < len(sent):
        raise _Diverged(matched)
    return _outcome(sent + "".join(pieces), done, first_token_at)


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
