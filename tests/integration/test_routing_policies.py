"""Routing policies end to end: the shared model queue (pull) keeps every guarantee of a worker's
queue, priorities go first, full queues are refused with 429, least-loaded avoids a busy worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from unittest.mock import ANY

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import keys, queue, registry
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator import snapshot as pool_snapshot_module
from gputorrent.coordinator.reaper import Reaper
from gputorrent.coordinator.snapshot import PoolSnapshot
from gputorrent.protocol import Job, JobResult, WorkerState
from gputorrent.worker.main import Worker
from tests.conftest import eventually

MakeWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def coordinator_settings(redis_url: str, request: pytest.FixtureRequest) -> CoordinatorSettings:
    """Pull routing unless a test asks for other settings (`with_settings`)."""
    values = {"routing": "pull", **getattr(request, "param", {})}
    return CoordinatorSettings(redis_url=redis_url, heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0, **values)


def with_settings(**values: object) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("coordinator_settings", [values], indirect=True)


async def _submit(api: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await api.post("/inference", json={"model": "fake", "prompt": "hello pool", **body})


async def _shared_queue(redis: Redis, model: str = "fake") -> list[Job]:
    return [
        Job.model_validate_json(body or "")
        for key in keys.model_queue_keys(model, cell=0)
        for _, body in await queue.read_held(redis, key)
    ]


async def test_a_pulled_job_waits_on_the_model_queue_until_a_worker_takes_it(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    accepted = (await _submit(api)).json()
    assert accepted["worker_id"] is None
    assert [job.request_id for job in await _shared_queue(redis)] == [accepted["request_id"]]
    assert await redis.llen(keys.queue_key("w1")) == 0
    status = await api.get(f"/result/{accepted['request_id']}")
    assert status.status_code == 202 and status.json()["worker_id"] is None

    await worker.run(asyncio.Event(), burst=True)
    result = (await api.get(f"/result/{accepted['request_id']}")).json()
    assert result["status"] == "completed" and result["worker_id"] == "w1"
    assert await _shared_queue(redis) == []
    assert await redis.llen(keys.processing_key("w1")) == 0


async def test_a_consumer_waiting_for_work_wakes_when_a_shared_job_arrives(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    taking = asyncio.create_task(queue.pop(redis, "w1", 20.0, ["fake"], result_ttl_s=60))
    await eventually(lambda: _blocked_clients(redis), "the consumer to block on its doorbells")
    started = time.monotonic()
    request_id = (await _submit(api)).json()["request_id"]
    lease = await asyncio.wait_for(taking, 10)
    assert lease is not None and lease.job.request_id == request_id and lease.job.worker_id == "w1"
    assert time.monotonic() - started < 5  # woken by the doorbell, not at the end of its 20 s wait
    assert await redis.hget(keys.job_key(request_id), "worker_id") == "w1"  # `end` looks for it there now


async def test_a_consumer_that_took_another_queues_job_leaves_a_shared_job_a_token_for_the_models_others(
    redis: Redis,
) -> None:
    for request_id, model, priority in (("low", "m1", 1), ("high", "m2", 9)):
        job = Job(request_id=request_id, worker_id="", shared=True, model=model, prompt="x",
                  enqueued_at=time.time(), priority=priority)  # fmt: skip
        assert await queue.enqueue(redis, job, ttl_s=60) == request_id
    # w1 serves both: its wait pops m1's token (the first doorbell holding one) and takes m2's job, of
    # the higher band.
    first = await queue.pop(redis, "w1", 1.0, ["m1", "m2"], result_ttl_s=60, wait_first=True)
    assert first is not None and first.job.request_id == "high"
    # w2 serves m1 alone, and waits for a token: it must not sleep out its 20 s block.
    second = await asyncio.wait_for(queue.pop(redis, "w2", 20.0, ["m1"], result_ttl_s=60, wait_first=True), 10)
    assert second is not None and second.job.request_id == "low"


async def _blocked_clients(redis: Redis) -> bool:
    return int((await redis.info("clients"))["blocked_clients"]) > 0


async def test_delete_and_deadlines_end_a_job_on_the_shared_queue(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    cancelled_id = (await _submit(api)).json()["request_id"]
    overdue_id = (await _submit(api, timeout_s=0.05)).json()["request_id"]

    cancelled = await api.delete(f"/inference/{cancelled_id}")
    assert cancelled.status_code == 200 and cancelled.json()["error"]["code"] == "cancelled"
    reaper = Reaper(redis, 0.1, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=0)
    await eventually(lambda: _ended_one(reaper), "the reaper to end the job past its deadline")
    assert (await api.get(f"/result/{overdue_id}")).json()["error"]["code"] == "timeout"
    assert await _shared_queue(redis) == []

    await worker.run(asyncio.Event(), burst=True)
    assert worker.jobs_done == 0


async def _ended_one(reaper: Reaper) -> bool:
    return await reaper.end_overdue() == 1


async def test_a_dead_workers_pulled_job_goes_back_to_the_shared_queue_with_an_attempt_counted(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    survivor = await fake_worker("w2")
    request_id = (await _submit(api)).json()["request_id"]
    lease = await queue.pop(redis, "w1", 1.0, ["fake"], result_ttl_s=60)
    assert lease is not None and lease.job.request_id == request_id
    await registry.mark_gone(redis, "w1")  # w1 dies holding the job

    assert await Reaper(redis, 0.1, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=0).reap_once() == 1
    [requeued] = await _shared_queue(redis)
    assert requeued.request_id == request_id and requeued.attempt == 2 and requeued.worker_id == ""
    assert await redis.hget(keys.job_key(request_id), "worker_id") == ""

    await survivor.run(asyncio.Event(), burst=True)
    assert (await api.get(f"/result/{request_id}")).json()["worker_id"] == "w2"
    # The lost worker's late result is refused: its lease is gone.
    assert not await queue.finish(redis, keys.processing_key("w1"), _completed(request_id), ttl_s=60, streamed=False)


def _completed(request_id: str) -> JobResult:
    return JobResult(request_id=request_id, status="completed", model="fake", worker_id="w1", output="late")


async def test_a_restarted_worker_puts_pulled_jobs_it_held_back_on_the_shared_queue(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    request_id = (await _submit(api)).json()["request_id"]
    assert await queue.pop(redis, "w1", 1.0, ["fake"], result_ttl_s=60) is not None
    assert await queue.recover(redis, "w1", max_attempts=3, ttl_s=60) == 1
    assert [job.request_id for job in await _shared_queue(redis)] == [request_id]


async def test_the_same_request_id_twice_is_one_pulled_job(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    first = await _submit(api, request_id="client-chosen-0002")
    second = await _submit(api, request_id="client-chosen-0002")
    assert first.json()["replayed"] is False and second.json()["replayed"] is True


@pytest.mark.parametrize("routing", ["pull", "round_robin"])
async def test_higher_priority_jobs_are_taken_first(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis, routing: str
) -> None:
    await fake_worker("w1")
    shared = routing == "pull"
    for i, priority in enumerate((1, 5, 9, 5, 0)):
        job = Job(
            request_id=f"job-{i}", worker_id="" if shared else "w1", shared=shared, model="fake", prompt="x",
            enqueued_at=time.time(), priority=priority,
        )  # fmt: skip
        assert await queue.enqueue(redis, job, ttl_s=60) == job.request_id
    taken = []
    while (lease := await queue.pop(redis, "w1", 0.05, ["fake"], result_ttl_s=60)) is not None:
        taken.append(lease.job.priority)
    assert taken == [9, 5, 5, 1, 0]


async def test_priority_is_checked_and_carried_to_the_job(
    api: httpx.AsyncClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")
    bad = await _submit(api, priority=10)
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "priority"
    await _submit(api, priority=8)
    assert [job.priority for job in await _shared_queue(redis)] == [8]
    assert await redis.llen(keys.model_queue_key("fake", 8, cell=0)) == 1


@with_settings(max_queue_per_model=2)
async def test_a_full_model_queue_is_refused_with_429_and_retry_after(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    assert [(await _submit(api)).status_code for _ in range(2)] == [202, 202]
    refused = await _submit(api)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limited" and "queue is full" in refused.json()["error"]["message"]
    openai_refused = await api.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    )
    assert openai_refused.status_code == 429 and "retry-after" in openai_refused.headers
    assert len(await _shared_queue(redis)) == 2


@with_settings(routing="round_robin", max_queue_per_worker=1)
async def test_a_full_worker_queue_is_refused_with_429(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    assert (await _submit(api)).status_code == 202
    refused = await _submit(api)
    assert refused.status_code == 429 and "w1" in refused.json()["error"]["message"]


@with_settings(routing="least_loaded")
async def test_least_loaded_sends_new_work_past_a_worker_with_a_backlog(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fake_worker("w1")
    await fake_worker("w2")
    # Within one snapshot's life, the coordinator counts the jobs it queued itself.
    routed = [(await _submit(api)).json()["worker_id"] for _ in range(6)]
    assert sorted(routed) == ["w1"] * 3 + ["w2"] * 3  # equal workers share the backlog evenly
    # A backlog queued elsewhere (another coordinator) shows in the next snapshot read: read every time here.
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_STALE_MAX_S", 0.0)
    for _ in range(4):
        job = Job(request_id=f"backlog-{_}", worker_id="w1", model="fake", prompt="x", enqueued_at=time.time())
        await queue.enqueue(redis, job, ttl_s=60)
    assert [(await _submit(api)).json()["worker_id"] for _ in range(3)] == ["w2", "w2", "w2"]


@with_settings(routing="least_loaded")
async def test_admission_reads_the_pool_afresh_before_refusing_for_want_of_a_worker(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")
    assert (await _submit(api)).status_code == 202  # the pool is read, and kept for a while
    await fake_worker("w2", model="other")
    reply = await api.post("/inference", json={"model": "other", "prompt": "x"})
    assert reply.status_code == 202 and reply.json()["worker_id"] == "w2"


@with_settings(routing="round_robin")
async def test_a_worker_registered_through_this_coordinator_is_routed_to_at_once(
    api: httpx.AsyncClient, fake_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_STALE_MAX_S", 60.0)  # no quiet spell forces a read
    await fake_worker("w1")
    assert (await _submit(api)).json()["worker_id"] == "w1"  # the pool is read, w1 alone
    await fake_worker("w2")
    routed = {(await _submit(api)).json()["worker_id"] for _ in range(2)}
    assert routed == {"w1", "w2"}  # the registration made admission read the pool again


async def test_compatible_apis_take_a_priority_header(
    api: httpx.AsyncClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    worker = await fake_worker("w1")
    chat = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    bad = await api.post("/v1/chat/completions", json=chat, headers={"x-gputorrent-priority": "10"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-gputorrent-priority"
    answer = asyncio.create_task(api.post("/v1/chat/completions", json=chat, headers={"x-gputorrent-priority": "8"}))

    async def queued_at_8() -> bool:
        return [job.priority for job in await _shared_queue(redis)] == [8]

    await eventually(queued_at_8, "the OpenAI request to wait in priority band 8")
    await worker.run(asyncio.Event(), burst=True)
    assert (await answer).status_code == 200


@with_settings(routing="session_affinity")
async def test_compatible_apis_take_a_session_header(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    workers = [await fake_worker(worker_id) for worker_id in ("w1", "w2", "w3")]
    stop = asyncio.Event()
    running = [asyncio.create_task(worker.run(stop)) for worker in workers]
    chat = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}

    async def served_by(session: str) -> str:
        """The worker that ran an OpenAI chat completion sent with `session`."""
        answer = await api.post("/v1/chat/completions", json=chat, headers={"x-gputorrent-session-id": session})
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["id"].removeprefix("chatcmpl-")
        return str((await api.get(f"/result/{request_id}")).json()["worker_id"])

    try:
        placed = {session: [await served_by(session) for _ in range(2)] for session in ("s1", "s2", "s3", "s4")}
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 10)
    assert all(first == again for first, again in placed.values()), placed  # each session keeps its worker
    assert len({first for first, _ in placed.values()}) > 1, placed  # and sessions spread over the pool


@pytest.mark.parametrize(
    ("path", "header", "value"),
    [
        ("/v1/chat/completions", "x-gputorrent-session-id", "has a space"),
        ("/api/chat", "x-gputorrent-priority", "high"),
        ("/v1/messages", "Idempotency-Key", "k" * 257),
    ],
)
async def test_a_bad_placement_or_idempotency_header_is_a_400_naming_it(
    api: httpx.AsyncClient, fake_worker: MakeWorker, path: str, header: str, value: str
) -> None:
    await fake_worker("w1")
    chat = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": False}
    bad = await api.post(path, json=chat, headers={header: value})
    assert bad.status_code == 400, bad.text
    assert header in bad.text


async def test_a_bad_idempotency_key_on_the_native_api_is_a_422_naming_the_header(api: httpx.AsyncClient) -> None:
    bad = await api.post("/inference", json={"model": "fake", "prompt": "x"}, headers={"Idempotency-Key": ""})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["fields"] == [{"field": "Idempotency-Key", "message": ANY}]


async def test_a_snapshot_past_its_age_is_read_again_behind_the_next_admission(
    redis: Redis, fake_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that come less often than the snapshot's age route on the view they have (within
    `SNAPSHOT_STALE_MAX_S`), and the pool is read after each is queued, so the next finds it fresh."""
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_MAX_AGE_S", 0.0)  # every admission finds it past its age
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_STALE_MAX_S", 60.0)  # and no look reads it before routing
    await fake_worker("w1")
    snapshot = PoolSnapshot()
    await snapshot.for_routing(redis)  # the first look reads the pool
    assert [w.queue_length for w in snapshot.workers] == [0]
    job = Job(request_id="elsewhere", worker_id="w1", model="fake", prompt="x", enqueued_at=time.time())
    await queue.enqueue(redis, job, ttl_s=60)  # as another coordinator would
    await snapshot.for_routing(redis)
    assert [w.queue_length for w in snapshot.workers] == [0]  # routed on the view it has
    snapshot.queued(redis, "admitted-here", None, "fake")  # an admission (onto a shared queue): read behind it

    async def read_again() -> bool:
        return [w.queue_length for w in snapshot.workers] == [1]

    await eventually(read_again, "the snapshot read behind the admission to show the other job")
    await snapshot.close()


async def test_a_reader_gets_a_read_that_began_after_it_asked(
    redis: Redis, fake_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read under way when a reader asks began before what the reader wants to see: the reader
    waits for it, then for one more."""
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_MAX_AGE_S", 0.0)
    await fake_worker("w1")
    snapshot = PoolSnapshot()
    reads = 0
    read_pool = registry.snapshot

    async def counted(client: Redis, known: registry.KnownRecords | None = None) -> list[WorkerState]:
        nonlocal reads
        reads += 1
        return await read_pool(client, known)

    monkeypatch.setattr(registry, "snapshot", counted)
    snapshot.queued(redis, "admitted-here", None, "fake")  # a read behind an admission, now under way
    await fake_worker("w2")  # joins while that read may be on its way
    assert [w.worker_id for w in await snapshot.current(redis)] == ["w1", "w2"]
    assert reads == 2
    await snapshot.close()


async def test_in_a_large_pool_a_request_for_a_model_nobody_serves_does_not_read_the_pool_each_time(
    redis: Redis, fake_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_snapshot_module, "LARGE_POOL_WORKERS", 0)  # one worker is a large pool here
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_MAX_AGE_S", 60.0)  # a slow moment cannot age it
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_STALE_MAX_S", 60.0)
    await fake_worker("w1")
    snapshot = PoolSnapshot()
    await snapshot.for_routing(redis, missed=True)  # never read: reads
    reads = 0

    async def counted(client: Redis, known: registry.KnownRecords | None = None) -> list[WorkerState]:
        nonlocal reads
        reads += 1
        return []

    monkeypatch.setattr(registry, "snapshot", counted)
    for _ in range(5):
        await snapshot.for_routing(redis, missed=True)
        assert snapshot.choose("least_loaded", "unknown", counter=1, affinity_key=None) is None
    assert reads == 0  # within the snapshot's age: the misses share the last read
    await snapshot.for_routing(redis, fresh=True)
    assert reads == 1
    await snapshot.close()
