"""Token streams through Redis: batched writes, ordered reads, the result last, cancellation."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable

import httpx
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
    return [item async for batch in streams.follow(redis, request_id, timeout_s=10) for _, item in batch]


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
    writer = streams.StreamWriter(functools.partial(streams.append, broken, "r1", "w1", ttl_s=60))
    writer.push("first")
    with pytest.raises((RedisError, OSError)):
        await writer.close()
    writer.push("after the failure")  # ignored: the stream already lacks text
    with pytest.raises((RedisError, OSError)):
        await writer.close()
    await broken.aclose()


def _sse_events(body: str) -> list[dict[str, str]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append(fields)
    return events


async def test_any_coordinator_can_follow_a_stream_and_resume_after_last_event_id(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    job = _job("one two three four")
    await queue.enqueue(redis, job, ttl_s=60)
    await worker.run(asyncio.Event(), burst=True)

    response = await api.get(f"/stream/{job.request_id}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    assert [e["event"] for e in events][-1] == "result"
    texts = "".join(json.loads(e["data"])["text"] for e in events if e["event"] == "token")
    assert texts == "echo: one two three four"
    assert all(e["id"] for e in events)

    first = events[0]["id"]
    rest = _sse_events((await api.get(f"/stream/{job.request_id}", headers={"Last-Event-ID": first})).text)
    assert [e["id"] for e in rest] == [e["id"] for e in events[1:]]  # nothing repeated, nothing lost


async def test_following_a_request_that_is_not_streamed_gives_its_result_event(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    request_id = (await api.post("/inference", json={"model": "fake", "prompt": "quiet"})).json()["request_id"]
    await worker.run(asyncio.Event(), burst=True)
    [event] = _sse_events((await api.get(f"/stream/{request_id}")).text)
    assert event["event"] == "result" and json.loads(event["data"])["output"] == "echo: quiet"
    assert (await api.get("/stream/no-such-request")).status_code == 404
    bad = await api.get(f"/stream/{request_id}", headers={"Last-Event-ID": "not-an-id"})
    assert bad.status_code == 422


async def test_a_worker_that_no_longer_holds_the_job_cannot_write_to_its_stream(redis: Redis) -> None:
    job = _job("x")
    await queue.enqueue(redis, job, ttl_s=60)  # queued for w1
    assert await streams.append(redis, job.request_id, "w1", "a", 1, ttl_s=60)
    await redis.hset(keys.job_key(job.request_id), "worker_id", "w2")  # it was handed on to w2
    assert not await streams.append(redis, job.request_id, "w1", " late", 1, ttl_s=60)
    assert await streams.sent_so_far(redis, job.request_id) == ("a", 1)


async def test_a_lease_that_was_taken_again_cannot_write_to_the_stream(redis: Redis) -> None:
    """A job handed back to its worker's queue and taken again keeps its holder's id: the first take's
    fence tells that lease apart (a stalled consumer, or a process whose id was registered again)."""
    job = _job("x")
    await queue.enqueue(redis, job, ttl_s=60)
    first = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert first is not None
    rid = job.request_id
    assert await streams.append(redis, rid, "w1", "a", 1, ttl_s=60, fence=first.fence)
    assert await queue.requeue(redis, keys.processing_key("w1"), first.job, fence=first.fence)
    second = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert second is not None and second.fence != first.fence
    assert not await streams.append(redis, rid, "w1", " stale", 1, ttl_s=60, fence=first.fence)
    assert await streams.append(redis, rid, "w1", " b", 1, ttl_s=60, fence=second.fence)
    assert await streams.sent_so_far(redis, rid) == ("a b", 2)
