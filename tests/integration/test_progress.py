"""A streamed request that waits in a queue shows its place there before its first token.

In process against a real Redis: one worker with one slot is kept busy by a long paced job, so
the streamed request behind it waits for more than one follow round (a second).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from gputorrent.worker.main import Worker
from tests.conftest import eventually

MakeWorker = Callable[..., Awaitable[Worker]]

TOKEN_DELAY_S = 0.1
LONG_PROMPT = " ".join(["word"] * 15)  # 16 tokens: the worker stays busy for 1.6 s


@pytest.fixture
async def busy_worker(api: httpx.AsyncClient, fake_worker: MakeWorker) -> AsyncIterator[str]:
    """A one-slot worker running a long job; yields that job's request id."""
    worker = await fake_worker("w1", token_delay_s=TOKEN_DELAY_S, slots=1)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    long_job = (await api.post("/inference", json={"model": "fake", "prompt": LONG_PROMPT})).json()["request_id"]

    async def taken() -> bool:
        return bool((await api.get(f"/result/{long_job}")).json()["status"] == "running")

    await eventually(taken, "the worker to take the long job, so the next one waits behind it")
    yield long_job
    stop.set()
    await asyncio.wait_for(running, 10)


async def test_a_waiting_native_stream_gets_progress_events_with_its_place(
    api: httpx.AsyncClient, busy_worker: str
) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    async with api.stream("POST", "/inference", json={"model": "fake", "prompt": "a b", "stream": True}) as response:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
    names = [name for name, _ in events]
    assert "progress" in names and names.index("progress") < names.index("token"), names
    progress = dict(events)["progress"]
    assert progress["status"] == "queued" and progress["position"] == 0  # nothing else waits before it
    assert names[-1] == "result"


async def test_a_waiting_openai_stream_gets_its_place_as_a_comment_line(
    api: httpx.AsyncClient, busy_worker: str
) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "a b"}], "stream": True}
    async with api.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments and comments[0].startswith(": queued, position 0"), lines
    assert lines[-1] == "data: [DONE]"
