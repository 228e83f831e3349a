"""Ending jobs on purpose and admitting them once: DELETE /inference/{id}, deadlines, idempotency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import keys, pool_stats, queue
from gputorrent.protocol import ErrorInfo, Job, JobResult
from gputorrent.worker.backends.fake import FakeBackend
from gputorrent.worker.ended import EndedJobs
from gputorrent.worker.executor import execute
from gputorrent.worker.main import Worker
from tests.conftest import eventually

MakeWorker = Callable[..., Awaitable[Worker]]
LONG_PROMPT = " ".join(["word"] * 200)  # 200 tokens: 10 s at 50 ms a token


async def _submit(api: httpx.AsyncClient, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    payload = {"model": "fake", "prompt": "hello pool", **body}
    return await api.post("/inference", json=payload, headers=headers)


async def _wait_status(api: httpx.AsyncClient, request_id: str, status: str) -> None:
    async def reached() -> bool:
        return bool((await api.get(f"/result/{request_id}")).json()["status"] == status)

    await eventually(reached, f"status {status}")


async def test_delete_ends_a_queued_job_at_once_and_it_never_runs(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    request_id = (await _submit(api)).json()["request_id"]

    cancelled = await api.delete(f"/inference/{request_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "failed"
    assert cancelled.json()["error"]["code"] == "cancelled"
    assert await redis.llen(keys.queue_key("w1")) == 0
    assert await redis.zcard(keys.deadlines(0)) == 0

    await worker.run(asyncio.Event(), burst=True)
    assert worker.jobs_done == 0
    assert (await api.get(f"/result/{request_id}")).json()["error"]["code"] == "cancelled"


async def test_delete_stops_a_running_job_at_its_next_token(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    worker = await fake_worker("w1", token_delay_s=0.05)
    request_id = (await _submit(api, prompt=LONG_PROMPT, options={"max_tokens": 500})).json()["request_id"]
    running = asyncio.create_task(worker.run(asyncio.Event(), burst=True))
    await _wait_status(api, request_id, "running")

    cancelled = await api.delete(f"/inference/{request_id}")
    assert cancelled.json()["error"]["code"] == "cancelled"
    await asyncio.wait_for(running, timeout=5)  # stopped long before its 10 s of tokens
    assert worker.jobs_done == 0  # its own result was refused
    result = (await api.get(f"/result/{request_id}")).json()
    assert result["status"] == "failed" and result["error"]["code"] == "cancelled"


async def test_ending_a_running_job_tells_its_worker_alone(redis: Redis) -> None:
    """One channel a worker: a cancel costs one delivery, not one to every worker of the pool."""
    job = Job(request_id="r-ended-1", worker_id="w1", model="m", prompt="p", enqueued_at=time.time())
    await queue.enqueue(redis, job, ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(keys.ended_channel("w1"), keys.ended_channel("w2"))
        cancelled = ErrorInfo(code="cancelled", message="the client left")
        assert await queue.end(redis, "r-ended-1", cancelled, ttl_s=60) is not None
        await redis.publish(keys.ended_channel("w2"), "marker")  # w2's next message, if it heard nothing else
        heard = []
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:  # None also stands for a subscription's reply
            if (message := await pubsub.get_message(timeout=1)) is not None:
                heard.append((message["channel"], message["data"]))
    assert heard == [(keys.ended_channel("w1"), "r-ended-1"), (keys.ended_channel("w2"), "marker")]


@pytest.mark.parametrize("kept_s", [30.0, 0.0])
async def test_an_end_heard_between_the_take_and_the_run_still_stops_the_job(redis: Redis, kept_s: float) -> None:
    """A job ended just after a worker took it is announced before the worker watches it: the
    announcement is kept, and the job's event is set the moment its run starts watching. Only for a
    while (`unwatched_keep_s`, here 30 s or none): a request id may be used again once its result
    expired, and that job must run."""
    worker_id = f"w-{uuid.uuid4().hex}"  # channels are server-wide, not per database: a name no other test uses
    for request_id in ("r-between", "r-running"):
        job = Job(request_id=request_id, worker_id=worker_id, model="m", prompt="p", enqueued_at=time.time())
        await queue.enqueue(redis, job, ttl_s=60)
        assert await queue.pop(redis, worker_id, timeout_s=1, result_ttl_s=60) is not None
    ended, stop = EndedJobs(), asyncio.Event()
    ended.unwatched_keep_s = kept_s
    running = ended.watch("r-running")
    listening = asyncio.create_task(ended.run(redis, [worker_id], stop))
    try:

        async def subscribed() -> bool:
            return dict(await redis.pubsub_numsub(keys.ended_channel(worker_id)))[keys.ended_channel(worker_id)] == 1

        await eventually(subscribed, "the worker's subscription")
        cancelled = ErrorInfo(code="cancelled", message="the client left")
        assert await queue.end(redis, "r-between", cancelled, ttl_s=60) is not None
        assert await queue.end(redis, "r-running", cancelled, ttl_s=60) is not None
        await asyncio.wait_for(running.wait(), 5)  # announced after r-between's, on the same channel
        assert ended.watch("r-between").is_set() is (kept_s > 0)
        assert not ended.watch("r-never-ended").is_set()
    finally:
        stop.set()
        await listening


async def test_delete_leaves_a_finished_job_as_it_was_and_an_unknown_id_is_404(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    worker = await fake_worker("w1")
    request_id = (await _submit(api)).json()["request_id"]
    await worker.run(asyncio.Event(), burst=True)

    again = await api.delete(f"/inference/{request_id}")
    assert again.status_code == 200 and again.json()["status"] == "completed"
    unknown = await api.delete("/inference/no-such-request")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "request_not_found"


async def test_a_queued_job_past_its_deadline_fails_with_code_timeout(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")  # registered but never running: the job stays queued
    request_id = (await _submit(api, timeout_s=0.2)).json()["request_id"]

    result = (await api.get(f"/result/{request_id}", params={"wait": 10})).json()
    assert result["status"] == "failed"
    assert result["error"]["code"] == "timeout"
    assert await redis.llen(keys.queue_key("w1")) == 0
    assert await redis.zcard(keys.deadlines(0)) == 0


async def test_a_running_job_past_its_deadline_fails_with_code_timeout(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    worker = await fake_worker("w1", token_delay_s=0.05)
    request_id = (await _submit(api, prompt=LONG_PROMPT, options={"max_tokens": 500}, timeout_s=0.5)).json()
    await asyncio.wait_for(worker.run(asyncio.Event(), burst=True), timeout=5)
    result = (await api.get(f"/result/{request_id['request_id']}")).json()
    assert result["status"] == "failed" and result["error"]["code"] == "timeout"


async def test_the_worker_ends_a_hung_generation_at_the_deadline() -> None:
    """No token ever comes: the deadline still ends the job (a backend that hangs cannot hold a slot)."""
    backend = FakeBackend(token_delay_s=3600)
    await backend.load("fake")
    job = Job(request_id="r1", worker_id="w1", model="fake", prompt="hi", enqueued_at=time.time(),
              deadline=time.time() + 0.2)  # fmt: skip
    result = await asyncio.wait_for(execute(backend, job), timeout=5)
    assert isinstance(result, JobResult)
    assert result.error is not None and result.error.code == "timeout"


async def test_the_same_request_id_twice_is_one_job(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    first = await _submit(api, request_id="client-chosen-0001")
    second = await _submit(api, request_id="client-chosen-0001")
    assert first.status_code == second.status_code == 202
    assert first.json()["request_id"] == second.json()["request_id"] == "client-chosen-0001"
    assert first.json()["replayed"] is False and second.json()["replayed"] is True
    assert await redis.llen(keys.queue_key("w1")) == 1


async def test_concurrent_submissions_with_one_idempotency_key_make_one_job(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    replies = await asyncio.gather(*(_submit(api, headers={"Idempotency-Key": "order-42"}) for _ in range(10)))
    assert {r.status_code for r in replies} == {202}
    assert len({r.json()["request_id"] for r in replies}) == 1
    assert sum(not r.json()["replayed"] for r in replies) == 1
    assert await redis.llen(keys.queue_key("w1")) == 1

    other = await _submit(api, headers={"Idempotency-Key": "order-43"})
    assert other.json()["request_id"] != replies[0].json()["request_id"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [("/v1/chat/completions", {}), ("/api/chat", {"stream": False}), ("/v1/messages", {"max_tokens": 16})],
)
async def test_an_idempotency_key_on_a_compatible_route_runs_the_job_once(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis, path: str, extra: dict[str, object]
) -> None:
    worker = await fake_worker("w1")
    body = {"model": "fake", "messages": [{"role": "user", "content": "once only"}], **extra}
    first = asyncio.create_task(api.post(path, json=body, headers={"Idempotency-Key": "k1"}))

    async def queued() -> bool:
        return bool(await redis.llen(keys.queue_key("w1")))

    await eventually(queued, "the request to be queued")
    await worker.run(asyncio.Event(), burst=True)
    second = await api.post(path, json=body, headers={"Idempotency-Key": "k1"})
    assert (await first).status_code == second.status_code == 200, second.text
    assert (await first).json().get("id") == second.json().get("id")  # OpenAI's and Anthropic's carry the job's id
    assert worker.jobs_done == 1


async def test_bad_timeouts_and_request_ids_are_400s_that_name_the_field(api: httpx.AsyncClient) -> None:
    for body, field in (({"timeout_s": 0}, "timeout_s"), ({"request_id": "short"}, "request_id")):
        response = await _submit(api, **body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["fields"][0]["field"] == field


async def test_an_idempotency_key_whose_job_and_result_expired_admits_a_new_job(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    first = (await _submit(api, headers={"Idempotency-Key": "late-retry"})).json()["request_id"]
    await redis.delete(keys.job_key(first), keys.result_key(first))  # as after the result's TTL
    again = await _submit(api, headers={"Idempotency-Key": "late-retry"})
    assert again.status_code == 202 and again.json()["request_id"] != first and not again.json()["replayed"]
    assert (await api.get(f"/result/{again.json()['request_id']}")).status_code == 202  # it exists


async def test_a_job_is_never_queued_for_a_worker_that_left(redis: Redis) -> None:
    job = Job(request_id="r-gone", worker_id="gone", model="fake", prompt="p", enqueued_at=time.time())
    with pytest.raises(queue.WorkerGone):
        await queue.enqueue(redis, job, ttl_s=60, require_alive=True)
    assert not await redis.exists(keys.queue_key("gone"), keys.job_key("r-gone"))


async def test_a_queued_job_shows_its_place_in_the_queue_and_when_it_should_start(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")  # registered, not running: everything waits in its queue
    ids = [(await _submit(api)).json()["request_id"] for _ in range(3)]
    urgent = (await _submit(api, priority=9)).json()["request_id"]
    statuses = [(await api.get(f"/result/{request_id}")).json() for request_id in [*ids, urgent]]
    assert [s["position"] for s in statuses] == [1, 2, 3, 0]  # the urgent one is taken first
    assert statuses[0]["eta_s"] is None  # nothing has finished lately: no estimate yet

    # Jobs that took 2.5 s each (3 s from admission, 0.5 s of it queued) finished just now.
    await pool_stats.add(redis, pool_stats.StatsDelta(jobs=2, latency_sum_s=6.0, queue_wait_sum_s=1.0), time.time() - 6)
    last = (await api.get(f"/result/{ids[2]}")).json()
    assert last["eta_s"] == pytest.approx(3 * 2.5)  # three jobs ahead, one slot
