"""The openai backend against stand-ins for OpenAI-compatible servers (no model behind them): the
requests it sends, as OpenAI's API reference documents them, and failures the way real servers fail."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gputorrent.errors import BackendError
from gputorrent.protocol import ChatMessage, InferenceOptions, Job
from gputorrent.worker.backends.openai import OpenAIBackend

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@contextlib.asynccontextmanager
async def _stand_in(chat: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A server answering `/v1/chat/completions` with `chat`; yields its base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def recording_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        choice = {"index": 0, "message": {"role": "assistant", "content": '{"name": "Ann"}'}, "finish_reason": "stop"}
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [choice]})

    async with _stand_in(chat) as url:
        yield url, bodies


@pytest.fixture
async def failing_server() -> AsyncIterator[str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n')
        await resp.write(b'data: {"error": {"message": "CUDA out of memory", "type": "server_error"}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with _stand_in(chat) as url:
        yield url


def _job(stream: bool, options: InferenceOptions | None = None) -> Job:
    return Job(
        request_id="r", worker_id="w", model="m", messages=[ChatMessage(role="user", content="hi")],
        options=options or InferenceOptions(), enqueued_at=time.time(), stream=stream,
    )  # fmt: skip


async def test_an_error_event_mid_stream_fails_the_job_instead_of_ending_it_early(failing_server: str) -> None:
    backend = OpenAIBackend(base_url=failing_server)
    try:
        with pytest.raises(BackendError, match="CUDA out of memory"):
            [item async for item in backend.generate(_job(stream=True))]
    finally:
        await backend.close()


async def test_a_reply_without_choices_is_a_backend_error(failing_server: str) -> None:
    backend = OpenAIBackend(base_url=failing_server)
    try:
        with pytest.raises(BackendError, match="without choices"):
            [item async for item in backend.generate(_job(stream=False))]
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("output_format", "response_format"),
    [
        (None, None),
        ("json", {"type": "json_object"}),
        (SCHEMA, {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA}}),
    ],
    ids=["text", "json", "schema"],
)
async def test_format_is_sent_as_response_format_documented_protocol(
    recording_server: tuple[str, list[dict[str, Any]]], output_format: Any, response_format: Any
) -> None:
    url, bodies = recording_server
    backend = OpenAIBackend(base_url=url)
    try:
        [item async for item in backend.generate(_job(stream=False, options=InferenceOptions(format=output_format)))]
    finally:
        await backend.close()
    (body,) = bodies
    assert body.get("response_format") == response_format
