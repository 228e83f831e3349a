"""Token streams through Redis: batched writes, ordered reads, the result last, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent import keys, queue, streams
from gputorrent.protocol import ErrorInfo, InferenceOptions, Job, JobResult, TokenChunk
from gputorrent.worker.main import Worker

MakeWorker = Callable[..., Awaitable[Worker]]


def _job(prompt: str, **options: object) -> Job:
    return Job(
        request_id=f"r{time.monotonic_ns()}", worker_id="w1", model="fake", prompt=prompt,
        options=InferenceOptions.model_validate(options), enqueued_at=time.time(), stream=True,
    )  # fmt: skip


async def _follow_all(redis: Redis, request_id: str) -> list[TokenChunk | JobResult]:
    return [item async for batch in streams.follow(redis, request_id, timeout_s=10) for item in batch]


async def test_a_fast_generation_is_written_in_a_few_batches_not_per_token(
    fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    words = " ".join(f"w{i}" for i in range(500))
    job = _job(words, max_tokens=1000)
    await queue.enqueue(redis, job, ttl_s=60)
    await worker.run(asyncio.Event(), burst=True)
    entries = await redis.xlen(keys.stream_key(job.request_id))
    assert 2 <= entries <= 10  # 501 tokens: a few text batches plus the result entry

    items = await _follow_all(redis, job.request_id)
    *chunks, result = items
    assert isinstance(result, JobResult) and result.status == "completed"
    assert "".join(c.text for c in chunks if isinstance(c, TokenChunk)) == result.output == f"echo: {words}"
    assert 0 < await redis.ttl(keys.stream_key(job.request_id)) <= 3600


async def test_a_job_that_is_not_streamed_writes_no_stream(fake_worker: MakeWorker, redis: Redis) -> None:
    worker = await fake_worker("w1")
    job = _job("quiet please").model_copy(update={"stream": False})
    await queue.enqueue(redis, job, ttl_s=60)
    await worker.run(asyncio.Event(), burst=True)
    assert not await redis.exists(keys.stream_key(job.request_id))
    assert await redis.exists(keys.result_key(job.request_id))


async def test_an_ended_stream_stops_its_job_at_the_next_token(fake_worker: MakeWorker, redis: Redis) -> None:
    worker = await fake_worker("w1", token_delay_s=0.05)
    job = _job(" ".join(["word"] * 200), max_tokens=500)
    await queue.enqueue(redis, job, ttl_s=60)
    running = asyncio.create_task(worker.run(asyncio.Event(), burst=True))
    first = await redis.xread({keys.stream_key(job.request_id): "0-0"}, block=5000, count=1)
    assert first, "no token was streamed"
    ended = await queue.end(redis, job.request_id, ErrorInfo(code="cancelled", message="client left"), ttl_s=60)
    assert ended is not None
    await asyncio.wait_for(running, timeout=5)  # 200 tokens at 50 ms would take 10 s

    *chunks, result = await _follow_all(redis, job.request_id)
    assert isinstance(result, JobResult)
    assert result.status == "failed"
    assert result.error is not None and result.error.code == "cancelled"
    assert len("".join(c.text for c in chunks if isinstance(c, TokenChunk)).split()) < 100
    assert worker.jobs_done == 0  # its own result was refused: the job already had one


async def test_follow_gives_up_after_its_timeout_without_a_result(redis: Redis) -> None:
    started = time.monotonic()
    batches = [batch async for batch in streams.follow(redis, "never-queued", timeout_s=0.5)]
    assert all(batch == [] for batch in batches)
    assert time.monotonic() - started < 3


async def test_a_failed_write_is_kept_for_close_not_lost_to_the_next_push(redis: Redis) -> None:
    broken = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)  # nothing listens there
    writer = streams.StreamWriter(broken, "r1", ttl_s=60)
    writer.push("first")
    with pytest.raises((RedisError, OSError)):
        await writer.close()
    writer.push("after the failure")  # ignored: the stream already lacks text
    with pytest.raises((RedisError, OSError)):
        await writer.close()
    await broken.aclose()
