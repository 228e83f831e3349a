"""The openai backend's requests as OpenAI's API reference documents them, seen by a recording
stand-in (no model behind it: it answers one fixed completion)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gputorrent.protocol import ChatMessage, InferenceOptions, Job
from gputorrent.worker.backends.openai import OpenAIBackend

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture
async def recording_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        choice = {"index": 0, "message": {"role": "assistant", "content": '{"name": "Ann"}'}, "finish_reason": "stop"}
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [choice]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1", bodies
    await runner.cleanup()


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
    job = Job(
        request_id="r", worker_id="w", model="m", messages=[ChatMessage(role="user", content="hi")],
        options=InferenceOptions(format=output_format), enqueued_at=time.time(),
    )  # fmt: skip
    try:
        [item async for item in backend.generate(job)]
    finally:
        await backend.close()
    (body,) = bodies
    assert body.get("response_format") == response_format
