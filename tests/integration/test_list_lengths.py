"""The lengths index (`keys.list_lengths(0)`): every script that moves a job writes the true length of
the lists it touched, so the pool snapshot reads each worker's load without reading its lists."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gputorrent import auth, keys, queue, registry
from gputorrent.protocol import ErrorInfo, Hardware, InferenceOptions, Job, JobResult, WorkerRecord


def _job(request_id: str, worker_id: str = "w1", priority: int = 5) -> Job:
    return Job(
        request_id=request_id, worker_id=worker_id, model="m", prompt="p", options=InferenceOptions(),
        enqueued_at=time.time(), priority=priority,
    )  # fmt: skip


async def _register(redis: Redis, *worker_ids: str) -> None:
    for worker_id in worker_ids:
        record = WorkerRecord(
            worker_id=worker_id, models=["m"], backend="fake", slots=1, hardware=Hardware(), registered_at=time.time()
        )
        await registry.register(redis, record, heartbeat_ttl_s=30, secret_hash=auth.hash_secret("s"))


async def _loads(redis: Redis) -> dict[str, tuple[int, int]]:
    """(queued, held) of each worker, as the pool snapshot reads them."""
    return {w.worker_id: (w.queue_length, w.jobs_held) for w in await registry.snapshot(redis)}


async def _index_is_true(redis: Redis) -> bool:
    """The index holds exactly the non-empty queues and processing lists, each with its length."""
    lists = [key for pattern in ("*queue:*", "processing:*") async for key in redis.scan_iter(match=pattern)]
    true = {key: await redis.llen(key) for key in lists}
    return await _indexed(redis) == {key: length for key, length in true.items() if length > 0}


async def _indexed(redis: Redis) -> dict[str, int]:
    """The lists the index holds, by name (without the registry's version, which it holds too)."""
    index = await redis.hgetall(keys.list_lengths(0))
    return {key: int(length) for key, length in index.items() if key != keys.REGISTRY_VERSION}


async def test_each_transition_keeps_every_workers_queued_and_held_counts(redis: Redis) -> None:
    await _register(redis, "w1", "w2")
    for request_id, priority in (("r1", 5), ("r2", 9), ("r3", 0)):
        await queue.enqueue(redis, _job(request_id, priority=priority), ttl_s=60)
    await queue.enqueue(redis, _job("r4", worker_id="w2"), ttl_s=60)
    assert await _loads(redis) == {"w1": (3, 0), "w2": (1, 0)}

    lease = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)  # the highest band first
    assert lease is not None and lease.job.request_id == "r2"
    assert await _loads(redis) == {"w1": (2, 1), "w2": (1, 0)}

    held_in = keys.processing_key("w1")
    assert await queue.retry_or_fail(redis, held_in, lease.job, started=True, target="w2", max_attempts=3, ttl_s=60)
    assert await _loads(redis) == {"w1": (2, 0), "w2": (2, 0)}

    cancelled = ErrorInfo(code="cancelled", message="the client left")
    assert await queue.end(redis, "r3", cancelled, ttl_s=60) is not None  # a queued job, ended
    assert await _loads(redis) == {"w1": (1, 0), "w2": (2, 0)}

    taken = await queue.pop(redis, "w2", timeout_s=1, result_ttl_s=60)
    assert taken is not None
    done = JobResult(request_id=taken.job.request_id, status="completed", model="m", worker_id="w2", output="ok")
    assert await queue.finish(redis, keys.processing_key("w2"), done, ttl_s=60, streamed=False)
    assert await _loads(redis) == {"w1": (1, 0), "w2": (1, 0)}
    assert await _index_is_true(redis)


async def test_a_shared_queue_is_indexed_and_counted_at_no_worker(redis: Redis) -> None:
    await _register(redis, "w1")
    await queue.enqueue(redis, _job("s1", worker_id="").model_copy(update={"shared": True}), ttl_s=60)
    assert await redis.hget(keys.list_lengths(0), keys.model_queue_key("m", cell=0)) == "1"
    assert await _loads(redis) == {"w1": (0, 0)}
    assert await queue.pop(redis, "w1", timeout_s=1, models=["m"], result_ttl_s=60) is not None
    assert await _loads(redis) == {"w1": (0, 1)}
    assert await _index_is_true(redis)


async def test_an_emptied_list_leaves_the_index_and_a_dropped_job_is_counted_out(redis: Redis) -> None:
    await _register(redis, "w1")
    for request_id in ("expired", "good"):
        await queue.enqueue(redis, _job(request_id), ttl_s=60)
    await redis.delete(keys.job_key("expired"))  # as its TTL would: the take drops it (`lists.forget`)
    lease = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert lease is not None and lease.job.request_id == "good"
    assert await _indexed(redis) == {keys.processing_key("w1"): 1}
    assert await _index_is_true(redis)


async def test_a_list_changed_by_hand_is_counted_right_at_its_next_move(redis: Redis) -> None:
    """The index is written with each list's length, not counted up and down, so it cannot drift
    for good: a queue emptied by hand is stale only until a job next joins or leaves it."""
    await _register(redis, "w1")
    for request_id in ("r1", "r2"):
        await queue.enqueue(redis, _job(request_id), ttl_s=60)
    await redis.delete(keys.queue_key("w1"))  # by hand
    assert await _loads(redis) == {"w1": (2, 0)}
    await queue.enqueue(redis, _job("r3"), ttl_s=60)
    assert await _loads(redis) == {"w1": (1, 0)}
    assert await _index_is_true(redis)


async def test_a_take_goes_by_the_index_and_is_right_where_the_index_is_wrong(redis: Redis) -> None:
    """A take pops the first list the index names (not every band in turn), checking that no list
    before it holds a job: a job the index does not know of (a list changed by hand) is still taken,
    and in its band's order."""
    await _register(redis, "w1")
    await queue.enqueue(redis, _job("r5"), ttl_s=60)
    await queue.enqueue(redis, _job("r9", priority=9), ttl_s=60)
    await redis.hdel(keys.list_lengths(0), keys.queue_key("w1", 9))  # the index misses the higher band
    first = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert first is not None and first.job.request_id == "r9" and first.more_queued
    await redis.hset(keys.list_lengths(0), keys.queue_key("w1", 0), 1)  # names a list that is empty
    await redis.hdel(keys.list_lengths(0), keys.queue_key("w1"))  # and misses the one that holds r5
    second = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert second is not None and second.job.request_id == "r5" and not second.more_queued
    assert await queue.pop(redis, "w1", timeout_s=0.1, result_ttl_s=60) is None


async def _pops(redis: Redis) -> int:
    """RPOPLPUSH calls the server has run, scripts' included."""
    return int((await redis.info("commandstats")).get("cmdstat_rpoplpush", {}).get("calls", 0))


async def test_a_take_by_the_index_pops_one_list_and_says_whether_more_wait_after_it(redis: Redis) -> None:
    await _register(redis, "w1")
    for request_id, priority in (("a", 9), ("b", 5), ("c", 0)):
        await queue.enqueue(redis, _job(request_id, priority=priority), ttl_s=60)
    before = await _pops(redis)
    taken = [await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) for _ in range(3)]
    assert await _pops(redis) - before == 3  # a pop for each band and queue tried in turn made 16
    assert [(t.job.request_id, t.more_queued) for t in taken if t is not None] == [
        ("a", True), ("b", True), ("c", False)
    ]  # fmt: skip
    assert await _index_is_true(redis)
