"""The Anthropic-compatible Messages API: `/v1/messages`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter

from gputorrent.coordinator import relay
from gputorrent.coordinator.adapters import anthropic as wire
from gputorrent.coordinator.deps import (
    ADMIT_HEADERS,
    OptionalHeader,
    SubmissionDep,
    headers_schema,
)
from gputorrent.coordinator.encoding import SSE_MEDIA_TYPE, SSE_RESPONSES, STREAM_HEADERS, sse
from gputorrent.errors import GPUTorrentError
from gputorrent.protocol import JobResult, JobStatus

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["anthropic"])
ANTHROPIC_VERSION_HEADER = OptionalHeader("anthropic-version", TypeAdapter(str), "accepted and ignored")


@router.post(
    "/messages",
    response_model=None,
    responses=SSE_RESPONSES,
    openapi_extra=headers_schema(*ADMIT_HEADERS, ANTHROPIC_VERSION_HEADER),
)
async def create_message(body: wire.MessagesRequest, submission: SubmissionDep) -> JSONResponse | StreamingResponse:
    """Anthropic's Messages API: a `Message`, or with `stream: true` its event stream."""
    accepted = await submission.admit(wire.to_inference(body))
    headers = {"request-id": accepted.request_id}  # the header Anthropic's SDKs expose as `_request_id`
    if not body.stream:
        return JSONResponse(wire.message(await submission.succeeded(accepted)), headers=headers)
    events = _events(submission.follow(accepted), accepted.request_id, body.model)
    return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers={**STREAM_HEADERS, **headers})


def _event(data: dict[str, Any]) -> bytes:
    return sse(data, event=data["type"])


async def _events(following: AsyncIterator[relay.Relayed], request_id: str, model: str) -> AsyncIterator[bytes]:
    """Anthropic's event sequence as tokens arrive; a failure mid-stream is an `error` event, as Anthropic sends it."""
    yield _event(wire.message_start(request_id, model))
    yield _event(wire.content_block_start())
    yield _event(wire.ping())
    result: JobResult | None = None
    try:
        async for _, item in following:
            if isinstance(item, JobResult):
                result = item
            elif isinstance(item, JobStatus):  # still queued: Anthropic's keep-alive event
                yield _event(wire.ping())
            elif item.text:
                yield _event(wire.text_delta(item.text))
    except GPUTorrentError as e:  # the response has begun, so the error goes in the stream
        yield _event(wire.error_body(e.http_status, e.message, e.code, None))
        return
    if result is None:  # the client left; relay.follow has cancelled the job
        return
    if result.status == "failed":
        failure = relay.failure(result)
        yield _event(wire.error_body(failure.http_status, failure.message, failure.code, None))
        return
    yield _event(wire.content_block_stop())
    yield _event(wire.message_delta(result))
    yield _event(wire.message_stop())
