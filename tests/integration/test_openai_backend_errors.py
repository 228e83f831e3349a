"""The openai backend against a server that fails the ways real ones do (a stand-in: no model behind it)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gputorrent.errors import BackendError
from gputorrent.protocol import InferenceOptions, Job
from gputorrent.worker.backends.openai import OpenAIBackend


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

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1"
    await runner.cleanup()


def _job(stream: bool) -> Job:
    return Job(
        request_id="r", worker_id="w", model="m", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
        options=InferenceOptions(), enqueued_at=time.time(), stream=stream,
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
