"""The Ollama-compatible API under `/api/`: generate, chat, embed, tags, ps, show, version and pull.

Streaming is on unless a request says `"stream": false`: NDJSON, one object per line, the last
with `"done": true` and the statistics; a failure after the stream has begun is a last line
`{"error": "..."}`, as Ollama sends it. The wire mapping and its known differences from Ollama
are in `coordinator/adapters/ollama.py`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from gputorrent import __version__, catalogue, routing
from gputorrent.coordinator import pulls, relay
from gputorrent.coordinator.adapters import ollama as wire
from gputorrent.coordinator.deps import (
    ADMIT_HEADERS_SCHEMA,
    RedisDep,
    SettingsDep,
    Submission,
    SubmissionDep,
    WaiterDep,
)
from gputorrent.coordinator.encoding import NDJSON_MEDIA_TYPE, NDJSON_RESPONSES, STREAM_HEADERS, ndjson
from gputorrent.coordinator.security import ClientDep, require_client
from gputorrent.coordinator.snapshot import current_pool
from gputorrent.errors import Forbidden, GPUTorrentError, ModelNotFound
from gputorrent.protocol import Accepted, EmbeddingRequest, InferenceRequest, JobResult, JobStatus, TokenChunk

router = APIRouter(prefix="/api", tags=["ollama"])

Chunk = Callable[[str], dict[str, Any]]
Final = Callable[[JobResult, str], dict[str, Any]]


def _now() -> str:
    return wire.timestamp(time.time())


@router.post("/generate", response_model=None, responses=NDJSON_RESPONSES, openapi_extra=ADMIT_HEADERS_SCHEMA)
async def generate(body: wire.GenerateRequest, submission: SubmissionDep) -> dict[str, Any] | StreamingResponse:
    """A completion of `prompt` (templated as a user turn unless `raw`), streamed by default."""
    if wire.is_load(body):
        await _require_served(submission.redis, body.model)
        return wire.load_reply(body, _now())
    job_request = wire.generate_to_inference(body)
    raw = bool(body.raw)

    def chunk(text: str) -> dict[str, Any]:
        return wire.generate_chunk(body.model, _now(), text)

    def final(result: JobResult, text: str) -> dict[str, Any]:
        return wire.generate_reply(body.model, _now(), result, text, raw)

    return await _answer(submission, job_request, chunk, final)


@router.post("/chat", response_model=None, responses=NDJSON_RESPONSES, openapi_extra=ADMIT_HEADERS_SCHEMA)
async def chat(body: wire.ChatRequest, submission: SubmissionDep) -> dict[str, Any] | StreamingResponse:
    """The assistant's next message in a chat, streamed by default."""
    if wire.is_load(body):
        await _require_served(submission.redis, body.model)
        return wire.load_reply(body, _now())
    job_request = wire.chat_to_inference(body)

    def chunk(text: str) -> dict[str, Any]:
        return wire.chat_chunk(body.model, _now(), text)

    def final(result: JobResult, text: str) -> dict[str, Any]:
        return wire.chat_reply(body.model, _now(), result, text)

    return await _answer(submission, job_request, chunk, final)


@router.get("/tags", dependencies=[Depends(require_client)])
async def list_models(redis: RedisDep) -> dict[str, Any]:
    """The models live workers serve."""
    return wire.tags(await current_pool(redis))


@router.get("/ps", dependencies=[Depends(require_client)])
async def running_models(redis: RedisDep) -> dict[str, Any]:
    """The models loaded on live workers, with the workers (non-standard `workers`) that hold each."""
    return wire.ps(await current_pool(redis))


@router.post("/show", dependencies=[Depends(require_client)])
async def show_model(body: wire.ModelRequest, redis: RedisDep) -> dict[str, Any]:
    """What the pool knows of a served model; 404 when no live worker serves it."""
    workers = await current_pool(redis)
    name = wire.requested_model(body)
    return wire.show(wire.resolve_model(name, routing.served_models(workers)) or name, workers)


@router.get("/version")
async def version() -> dict[str, str]:
    """The coordinator's version (GPU Torrent's, not an Ollama version)."""
    return {"version": __version__}


@router.post(
    "/pull",
    response_model=None,
    responses=NDJSON_RESPONSES,
)
async def pull(
    body: wire.PullRequest,
    request: Request,
    redis: RedisDep,
    waiter: WaiterDep,
    settings: SettingsDep,
    caller: ClientDep,
) -> dict[str, Any] | StreamingResponse:
    """Pull the model onto every live worker whose backend can pull and that lacks it, with each one's
    progress (streamed by default); success at once when none lacks it and a live worker serves it.

    Starting a download needs an admin key (403 otherwise): it fills other machines' disks and links.
    """
    name = wire.pulled_model(body)
    workers = await current_pool(redis)
    # From the swarm only a catalogued model that a live worker holds: without one a fetch would only wait.
    in_swarm = bool(catalogue.holders(name, workers)) and await catalogue.has(redis, name)
    plan = pulls.plan(name, workers, wire.resolve_model, in_catalogue=in_swarm)
    if not plan.targets:
        if not plan.served:
            raise pulls.cannot_pull(name, workers)
        return _pulled_at_once(body)
    if not caller.admin:
        raise Forbidden(
            f"pulling {name!r} would download it onto {len(plan.targets)} worker(s) ({', '.join(plan.targets)}): "
            "that needs an admin key"
        )
    stream = wire.streaming(body)
    started = await pulls.start(
        redis, name, plan.targets, settings, caller, stream=stream, insecure=bool(body.insecure)
    )
    if not stream:
        failed = pulls.failure(name, [*started.failed, *await pulls.wait(waiter, started, pulls.wait_s(settings))])
        if failed is not None:
            raise failed
        return {"status": "success"}
    following = pulls.follow(redis, started, pulls.wait_s(settings), settings.result_ttl_s, request.is_disconnected)
    return StreamingResponse(
        _pull_lines(name, started, following), media_type=NDJSON_MEDIA_TYPE, headers=STREAM_HEADERS
    )


def _pulled_at_once(body: wire.PullRequest) -> dict[str, Any] | StreamingResponse:
    if not wire.streaming(body):
        return {"status": "success"}

    async def lines() -> AsyncIterator[bytes]:
        yield ndjson({"status": "success"})

    return StreamingResponse(lines(), media_type=NDJSON_MEDIA_TYPE, headers=STREAM_HEADERS)


async def _pull_lines(
    name: str, started: pulls.Started, following: AsyncIterator[pulls.Progress | pulls.Finished]
) -> AsyncIterator[bytes]:
    """Each worker's progress as Ollama's lines, tagged with the worker; then one `success` when every
    worker has the model, or one `error` line naming those whose pull failed."""
    finished = list(started.failed)
    for worker_id in started.jobs.values():
        yield ndjson(wire.pull_queued(worker_id))
    for gone in started.failed:
        yield ndjson(wire.pull_ended(gone.worker_id, gone.error))
    try:
        async for event in following:
            if isinstance(event, pulls.Progress):
                yield ndjson(wire.pull_progress(event.worker_id, event.line))
            else:
                finished.append(event)
                yield ndjson(wire.pull_ended(event.worker_id, event.error))
    except GPUTorrentError as e:  # no result in time, or Redis lost: the status line went out long ago
        yield ndjson(wire.error_line(e.message))
        return
    failed = pulls.failure(name, finished)
    yield ndjson(wire.error_line(failed.message) if failed is not None else {"status": "success"})


@router.post("/embed", openapi_extra=ADMIT_HEADERS_SCHEMA)
async def embed(body: wire.EmbedRequest, submission: SubmissionDep) -> dict[str, Any]:
    """One vector per input text, computed on a worker that serves the model."""
    accepted = await _admit(submission, wire.embed_to_request(body.model, body.input))
    return wire.embed_reply(await submission.succeeded(accepted))


@router.post("/embeddings", openapi_extra=ADMIT_HEADERS_SCHEMA)
async def embeddings(body: wire.LegacyEmbeddingsRequest, submission: SubmissionDep) -> dict[str, Any]:
    """The older single-text endpoint: `{"embedding": [...]}`."""
    result = await submission.succeeded(await _admit(submission, wire.embed_to_request(body.model, body.prompt)))
    return {"embedding": (result.embeddings or [[]])[0]}


async def _require_served(redis: RedisDep, name: str) -> None:
    """404 unless a live worker serves the model `name` means (see `wire.resolve_model`)."""
    served = routing.served_models(await current_pool(redis))
    if wire.resolve_model(name, served) is None:
        raise wire.model_not_found(name, served)


async def _admit(submission: Submission, job_request: InferenceRequest | EmbeddingRequest) -> Accepted:
    """Admit the request; a name no live worker serves is tried with or without `:latest`, then 404."""
    try:
        return await submission.admit(job_request)
    except ModelNotFound as e:
        served = list(e.details.get("available_models", []))
        resolved = wire.resolve_model(job_request.model, served)
        if resolved is None:
            raise wire.model_not_found(job_request.model, served) from None
    return await submission.admit(job_request.model_copy(update={"model": resolved}))


async def _answer(
    submission: Submission, job_request: InferenceRequest, chunk: Chunk, final: Final
) -> dict[str, Any] | StreamingResponse:
    accepted = await _admit(submission, job_request)
    if not job_request.stream:
        result = await submission.succeeded(accepted)
        return final(result, result.output or "")
    return StreamingResponse(
        _lines(submission.follow(accepted), chunk, final), media_type=NDJSON_MEDIA_TYPE, headers=STREAM_HEADERS
    )


async def _lines(following: AsyncIterator[relay.Relayed], chunk: Chunk, final: Final) -> AsyncIterator[bytes]:
    """One line per batch of text, then the final line; a failure on the way is an `error` line."""
    try:
        async for _, item in following:
            if isinstance(item, JobStatus):  # Ollama's stream has no place for it
                continue
            if isinstance(item, TokenChunk):
                yield ndjson(chunk(item.text))
            elif item.status == "failed":
                yield ndjson(wire.error_line(relay.failure(item).message))
            else:
                yield ndjson(final(item, ""))
    except GPUTorrentError as e:  # no result in time, or Redis lost: the status line went out long ago
        yield ndjson(wire.error_line(e.message))
