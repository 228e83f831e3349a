"""A result travels on `results:ready`, and a request waiting for the job it just queued needs no read of Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gputorrent import keys, queue
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.protocol import Job, JobResult
from tests.conftest import eventually


async def _finished(redis: Redis, result: JobResult, *, stream: bool = False) -> None:
    """Queue a job for w1, take it as w1 and store `result` for it, as a worker does."""
    job = Job(
        request_id=result.request_id, worker_id="w1", model="m", prompt="x", stream=stream, enqueued_at=time.time()
    )
    await queue.enqueue(redis, job, ttl_s=60)
    lease = await queue.pop(redis, "w1", 1.0, result_ttl_s=60)
    assert lease is not None
    assert await queue.finish(redis, keys.processing_key("w1"), result, 60, streamed=stream)


@pytest.fixture
async def announcements(redis: Redis) -> AsyncIterator[asyncio.Queue[str]]:
    """Every message on `results:ready` from now on."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(keys.RESULTS_CHANNEL)

        async def listen() -> None:
            async for message in pubsub.listen():
                heard.put_nowait(message["data"])

        listening = asyncio.create_task(listen())
        yield heard
        listening.cancel()


async def test_a_result_is_announced_with_itself_unless_it_streamed_or_is_large(
    redis: Redis, announcements: asyncio.Queue[str]
) -> None:
    small = JobResult(request_id="small-result", status="completed", model="m", worker_id="w1", output="hi")
    await _finished(redis, small)
    request_id, carried = queue.read_announcement(await asyncio.wait_for(announcements.get(), 5))
    assert request_id == "small-result" and carried is not None
    assert JobResult.model_validate_json(carried) == small

    streamed = small.model_copy(update={"request_id": "streamed-result"})
    await _finished(redis, streamed, stream=True)
    assert queue.read_announcement(await asyncio.wait_for(announcements.get(), 5)) == ("streamed-result", None)

    large = JobResult(
        request_id="large-result", status="completed", model="m", worker_id="w1", output="x" * (70 * 1024)
    )
    await _finished(redis, large)
    assert queue.read_announcement(await asyncio.wait_for(announcements.get(), 5)) == ("large-result", None)
    assert await queue.lookup(redis, "large-result") == large  # whoever waits reads it


async def test_a_just_admitted_request_gets_its_announced_result_without_reading_redis() -> None:
    # A client of nothing: any read of Redis would fail the wait.
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    waiter = ResultWaiter(unreachable)
    result = JobResult(request_id="fast-job", status="completed", model="m", worker_id="w1", output="done")
    waiter.announced("fast-job", result.model_dump_json())  # announced before the request waits
    assert await waiter.wait("fast-job", timeout_s=5, admitted=True) == result

    waiting = asyncio.create_task(waiter.wait("later-job", timeout_s=5, admitted=True))

    async def parked() -> bool:  # without a read: a read would have failed it
        return "later-job" in waiter._events

    await eventually(parked, "the waiter to park", timeout_s=5)
    later = result.model_copy(update={"request_id": "later-job"})
    waiter.announced("later-job", later.model_dump_json())
    assert await asyncio.wait_for(waiting, 5) == later
    await unreachable.aclose()


async def test_an_announcement_without_the_result_makes_the_waiter_read_it(redis: Redis) -> None:
    waiter = ResultWaiter(redis)
    result = JobResult(request_id="big-job", status="completed", model="m", worker_id="w1", output="x")
    await redis.set(keys.result_key("big-job"), result.model_dump_json())
    waiter.announced("big-job", None)
    assert await waiter.wait("big-job", timeout_s=5, admitted=True) == result


async def test_the_waiters_memory_of_results_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gputorrent.coordinator import results

    monkeypatch.setattr(results, "RECENT_RESULTS_MAX_CHARS", 4096)
    waiter = ResultWaiter(Redis(host="127.0.0.1", port=1))
    for n in range(100):
        waiter.announced(f"job-{n:04d}", "x" * 100)
    assert 0 < waiter._recent_chars <= 4096
    assert "job-0099" in waiter._recent and "job-0000" not in waiter._recent
