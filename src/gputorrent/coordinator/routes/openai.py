"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`
(and `/v1/models/{model}`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from gputorrent import routing
from gputorrent.coordinator import relay
from gputorrent.coordinator.adapters import openai as wire
from gputorrent.coordinator.deps import (
    ADMIT_HEADERS_SCHEMA,
    RedisDep,
    SubmissionDep,
)
from gputorrent.coordinator.encoding import SSE_DONE, SSE_MEDIA_TYPE, SSE_RESPONSES, STREAM_HEADERS, sse
from gputorrent.coordinator.security import require_client
from gputorrent.coordinator.snapshot import current_pool
from gputorrent.errors import GPUTorrentError, ModelNotFound
from gputorrent.protocol import JobResult, JobStatus

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", dependencies=[Depends(require_client)])
async def list_models(redis: RedisDep) -> dict[str, Any]:
    """The models live workers serve."""
    return wire.models(routing.served_models(await current_pool(redis)))


@router.get("/models/{model:path}", dependencies=[Depends(require_client)])
async def retrieve_model(model: str, redis: RedisDep) -> dict[str, Any]:
    """One model, while a live worker serves it (a name may hold slashes: a GGUF path, `org/name`)."""
    served = routing.served_models(await current_pool(redis))
    if model not in served:
        raise ModelNotFound(f"model {model!r} is not served by any live worker", available_models=served)
    return wire.model(model)


@router.post("/chat/completions", response_model=None, responses=SSE_RESPONSES, openapi_extra=ADMIT_HEADERS_SCHEMA)
async def chat_completions(
    body: wire.ChatCompletionRequest, submission: SubmissionDep
) -> JSONResponse | StreamingResponse:
    accepted = await submission.admit(wire.chat_to_inference(body).model_copy(update={"stream": body.stream}))
    created = int(time.time())
    if not body.stream:
        # A response of our own: FastAPI would walk the dict through its encoder first, on every request.
        return JSONResponse(wire.chat_completion(await submission.succeeded(accepted), created))

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        return wire.chat_chunk(accepted.request_id, body.model, created, {"content": text}, finish_reason)

    first = wire.chat_chunk(accepted.request_id, body.model, created, {"role": "assistant", "content": ""})
    events = _events(submission.follow(accepted), first, chunk, body, "chat.completion.chunk", created)
    return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=STREAM_HEADERS)


@router.post("/completions", response_model=None, responses=SSE_RESPONSES, openapi_extra=ADMIT_HEADERS_SCHEMA)
async def completions(body: wire.CompletionRequest, submission: SubmissionDep) -> JSONResponse | StreamingResponse:
    accepted = await submission.admit(wire.completion_to_inference(body).model_copy(update={"stream": body.stream}))
    created = int(time.time())
    if not body.stream:
        return JSONResponse(wire.completion(await submission.succeeded(accepted), created))

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        return wire.completion_chunk(accepted.request_id, body.model, created, text, finish_reason)

    events = _events(submission.follow(accepted), None, chunk, body, "text_completion", created)
    return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=STREAM_HEADERS)


@router.post("/embeddings", openapi_extra=ADMIT_HEADERS_SCHEMA)
async def embeddings(body: wire.EmbeddingsRequest, submission: SubmissionDep) -> dict[str, Any]:
    accepted = await submission.admit(wire.embeddings_to_request(body))
    return wire.embeddings(await submission.succeeded(accepted), body.encoding_format)


async def _events(
    following: AsyncIterator[relay.Relayed],
    first: dict[str, Any] | None,
    chunk: Callable[[str, str | None], dict[str, Any]],
    body: wire.ChatCompletionRequest | wire.CompletionRequest,
    object_name: str,
    created: int,
) -> AsyncIterator[bytes]:
    """SSE chunks as tokens arrive; a failure mid-stream is an `error` event, as OpenAI sends it."""
    if first is not None:
        yield sse(first)
    try:
        async for _, item in following:
            if isinstance(item, JobStatus):  # a comment line: clients skip it, a person watching with curl sees it
                starts = f"starts in about {item.eta_s} s" if item.eta_s is not None else "start time unknown"
                yield f": queued, position {item.position}, {starts}\n\n".encode()
                continue
            if not isinstance(item, JobResult):
                yield sse(chunk(item.text, None))
                continue
            if item.status == "failed":
                error = relay.failure(item)
                yield sse(wire.error_body(502, error.message, error.code, None))
                return
            yield sse(chunk("", item.finish_reason or "stop"))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(wire.usage_chunk(item, created, object_name))
            yield SSE_DONE
    except GPUTorrentError as e:  # the response has started: the error travels as the stream's last event
        yield sse(wire.error_body(e.http_status, e.message, e.code, None))
