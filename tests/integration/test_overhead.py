"""`x-gputorrent-overhead-ms` and the split of `timings`: what the pool adds besides inference.

In process against a real Redis, with a worker on the fake backend pacing its tokens, so
inference takes a known least time that the overhead must not include.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from gputorrent.coordinator.overhead import HEADER
from gputorrent.worker.main import Worker

MakeWorker = Callable[..., Awaitable[Worker]]

TOKEN_DELAY_S = 0.1  # "echo: a b" is three tokens, each after this pause: at least 0.3 s of inference
PROMPT = "a b"
LEAST_INFERENCE_MS = 3 * TOKEN_DELAY_S * 1000


@pytest.fixture
async def paced_worker(fake_worker: MakeWorker) -> AsyncIterator[Worker]:
    worker = await fake_worker("w1", token_delay_s=TOKEN_DELAY_S)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    yield worker
    stop.set()
    await asyncio.wait_for(running, 10)


def _overhead(response: httpx.Response) -> float:
    return float(response.headers[HEADER])


async def test_a_completion_reports_its_overhead_without_the_inference(
    api: httpx.AsyncClient, paced_worker: Worker
) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": PROMPT}]}
    started = time.perf_counter()
    response = await api.post("/v1/chat/completions", json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    assert elapsed_ms >= LEAST_INFERENCE_MS
    overhead_ms = _overhead(response)
    # The paced tokens are inference, not overhead: at most what remains of the request's time.
    assert 0 < overhead_ms <= elapsed_ms - LEAST_INFERENCE_MS


async def test_a_stream_splits_its_timings_and_its_result_carries_the_whole_overhead(
    api: httpx.AsyncClient, paced_worker: Worker
) -> None:
    started = time.perf_counter()
    async with api.stream("POST", "/inference", json={"model": "fake", "prompt": PROMPT, "stream": True}) as response:
        header_ms = _overhead(response)  # sent as the stream starts: the admission
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    elapsed_ms = (time.perf_counter() - started) * 1000
    result = json.loads(lines[-1][5:])
    timings = result["timings"]
    assert timings["inference_ms"] >= LEAST_INFERENCE_MS
    assert 0 < timings["admission_ms"] <= header_ms
    assert timings["queued_ms"] >= 0 and timings["dispatch_ms"] >= 0
    parts_ms = timings["admission_ms"] + timings["queued_ms"] + timings["dispatch_ms"]
    # The request that submitted the job: its whole time here less inference, so relaying counts too.
    assert parts_ms - 1 <= timings["overhead_ms"] <= elapsed_ms - timings["inference_ms"]

    # Read again by another request, the result's overhead is the sum of the parts it recorded.
    again = await api.get(f"/result/{result['request_id']}")
    assert again.status_code == 200
    assert again.json()["timings"]["overhead_ms"] == pytest.approx(parts_ms, abs=0.01)
    assert _overhead(again) == pytest.approx(parts_ms, abs=0.01)


async def test_a_response_without_a_result_is_all_overhead(api: httpx.AsyncClient) -> None:
    started = time.perf_counter()
    response = await api.get("/workers")
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert 0 < _overhead(response) <= elapsed_ms
