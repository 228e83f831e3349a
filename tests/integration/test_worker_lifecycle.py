"""A worker's life beyond serving: draining on stop, unhealthy backends, resuming a stream elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import keys, queue, registry, streams
from gputorrent.coordinator import snapshot as pool_snapshot_module
from gputorrent.errors import BackendUnavailable
from gputorrent.protocol import GenerationDone, Heartbeat, InferenceOptions, Job, JobResult, TokenChunk
from gputorrent.worker.backends.fake import FakeBackend
from gputorrent.worker.main import Worker
from tests.conftest import TEST_DB, eventually

MakeWorker = Callable[..., Awaitable[Worker]]
WORDS = [f"w{i}" for i in range(60)]  # 61 tokens with "echo:": 3 s at 50 ms a token
EXPECTED = "echo: " + " ".join(WORDS)


async def _submit(api: httpx.AsyncClient, **body: Any) -> str:
    payload = {"model": "fake", "prompt": " ".join(WORDS), "options": {"max_tokens": 100, "temperature": 0}}
    response = await api.post("/inference", json=payload | body)
    assert response.status_code == 202, response.text
    return str(response.json()["request_id"])


async def _enqueue_streamed(redis: Redis, worker_id: str, temperature: float = 0.0) -> str:
    """A streamed job, queued directly (the in-process client would hold the stream until it ends)."""
    job = Job(
        request_id=f"r{time.monotonic_ns()}", worker_id=worker_id, model="fake", prompt=" ".join(WORDS),
        options=InferenceOptions(max_tokens=100, temperature=temperature), enqueued_at=time.time(), stream=True,
    )  # fmt: skip
    await queue.enqueue(redis, job, ttl_s=60)
    return job.request_id


async def _state(api: httpx.AsyncClient, worker_id: str) -> str | None:
    for worker in (await api.get("/workers")).json():
        if worker["worker_id"] == worker_id:
            return str(worker["state"])
    return None


@contextlib.asynccontextmanager
async def _serving(worker: Worker) -> AsyncIterator[None]:
    """The worker runs (heartbeat and all) inside the block and is stopped after it."""
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)


async def _holds(redis: Redis, worker_id: str, request_id: str) -> bool:
    return await redis.lpos(keys.processing_key(worker_id), request_id) is not None


async def _streamed_tokens(redis: Redis, request_id: str) -> int:
    return (await streams.sent_so_far(redis, request_id))[1]


async def _followed(redis: Redis, request_id: str) -> tuple[str, JobResult]:
    text, result = "", None
    async for batch in streams.follow(redis, request_id, timeout_s=20):
        for _, item in batch:
            if isinstance(item, TokenChunk):
                text += item.text
            else:
                result = item
    assert result is not None, "the stream ended without a result"
    return text, result


async def test_a_stopped_worker_hands_its_queue_on_finishes_its_job_and_leaves(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read of the pool (the reaper's) that overlaps r1's admission may count r1 twice until the next
    # read, and send r3 to w2: admission reads the pool before each request instead.
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_STALE_MAX_S", 0.0)
    w1 = await fake_worker("w1", token_delay_s=0.02, drain_timeout_s=10)
    w2 = await fake_worker("w2")
    # Least loaded, ties to the first id: r1 and r3 go to w1, r2 to w2.
    r1, r2, r3 = [await _submit(api) for _ in range(3)]
    assert await redis.llen(keys.queue_key("w1")) == 2
    stop = asyncio.Event()
    running = asyncio.create_task(w1.run(stop))
    await eventually(lambda: _is_running(api, r1), "w1 to start r1")
    stop.set()

    await eventually(lambda: _state_is(api, "w1", "draining"), "w1 to say it drains")
    await asyncio.wait_for(running, timeout=10)
    assert (await api.get(f"/result/{r1}")).json()["status"] == "completed"  # finished within its grace
    assert await _state(api, "w1") is None  # left the registry
    assert await redis.llen(keys.queue_key("w2")) == 2  # its own r2, and r3 from w1
    await w2.run(asyncio.Event(), burst=True)
    for request_id in (r2, r3):
        assert (await api.get(f"/result/{request_id}")).json()["worker_id"] == "w2"


async def _is_running(api: httpx.AsyncClient, request_id: str) -> bool:
    return bool((await api.get(f"/result/{request_id}")).json()["status"] == "running")


async def _state_is(api: httpx.AsyncClient, worker_id: str, state: str) -> bool:
    return await _state(api, worker_id) == state


async def test_a_worker_whose_id_another_process_registered_stops_and_leaves_that_ids_jobs_alone(
    api: httpx.AsyncClient, redis: Redis, fake_worker: MakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker linked to Redis reads its record every `REGISTRATION_LOOK_EVERY` beats (5 s at the
    tests' 0.5 s beats): once the record is another registration's it stops by itself at once (its
    job stopped at the next token, no drain grace), and hands neither the id's queue nor its held
    job on: they are the other process's now (its own orphan check takes the held job back)."""
    worker = await fake_worker("w1", token_delay_s=0.5, slots=1)  # a job takes 30 s
    await fake_worker("w2")  # alive, not consuming: where a hand-on would put w1's jobs
    await redis.set(keys.heartbeat_key("w2"), Heartbeat(at=time.time()).model_dump_json(), px=60_000)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    held = await _enqueue_streamed(redis, "w1")
    await eventually(lambda: _holds(redis, "w1", held), "the worker taking the first job")
    queued = await _enqueue_streamed(redis, "w1")
    again = {"worker_id": "w1", "models": ["fake"], "backend": "fake"}  # an admin's key may take a live id
    response = await api.post("/register", json=again)
    assert response.status_code == 200, response.text
    record = await redis.get(keys.worker_key("w1"))
    await asyncio.wait_for(running, timeout=15)  # it stopped without being told to
    assert stop.is_set()
    assert "another process registered this id" in caplog.text
    assert await redis.get(keys.worker_key("w1")) == record
    assert await redis.sismember(keys.workers(0), "w1")
    assert await redis.lrange(keys.queue_key("w1"), 0, -1) == [queued]
    assert await redis.lrange(keys.processing_key("w1"), 0, -1) == [held]


async def test_an_idle_worker_whose_id_another_process_registered_does_not_deregister_it(
    api: httpx.AsyncClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    """With nothing in its lists a stopping worker leaves the registry; a replaced one must not, or it
    would remove the other process's registration."""
    worker = await fake_worker("w1")
    running = asyncio.create_task(worker.run(asyncio.Event()))
    await eventually(lambda: redis.exists(keys.heartbeat_key("w1")), "the worker's first beat")
    response = await api.post("/register", json={"worker_id": "w1", "models": ["fake"], "backend": "fake"})
    assert response.status_code == 200, response.text
    record = await redis.get(keys.worker_key("w1"))
    await asyncio.wait_for(running, timeout=15)
    assert await redis.get(keys.worker_key("w1")) == record
    assert await redis.sismember(keys.workers(0), "w1")


async def test_a_job_still_running_after_the_drain_grace_resumes_on_another_worker_without_a_repeated_token(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    w1 = await fake_worker("w1", token_delay_s=0.05, drain_timeout_s=0.3)
    request_id = await _enqueue_streamed(redis, "w1")
    w2 = await fake_worker("w2", token_delay_s=0.05)  # registered after: the job went to w1
    stop = asyncio.Event()
    running = asyncio.create_task(w1.run(stop))
    await eventually(lambda: _has_tokens(redis, request_id, 3), "w1 to stream a few tokens")
    # w2 serves meanwhile, so it starts the handed-on job at once, racing any late token of w1's.
    async with _serving(w2):
        stop.set()
        await asyncio.wait_for(running, timeout=10)
        text, result = await _followed(redis, request_id)
    assert text == result.output == EXPECTED  # nothing lost, nothing repeated
    assert result.worker_id == "w2"
    assert result.resumed is not None and result.resumed.exact
    assert 3 <= result.resumed.after_tokens < len(WORDS)
    assert result.usage.completion_tokens == len(WORDS) + 1


async def _has_tokens(redis: Redis, request_id: str, count: int) -> bool:
    return await _streamed_tokens(redis, request_id) >= count


async def test_a_stream_whose_worker_dies_is_resumed_by_another_from_the_tokens_sent(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    w1 = await fake_worker("w1", token_delay_s=0.05)
    request_id = await _enqueue_streamed(redis, "w1", temperature=0.7)
    w2 = await fake_worker("w2")
    running = asyncio.create_task(w1.run(asyncio.Event()))
    await eventually(lambda: _has_tokens(redis, request_id, 3), "w1 to stream a few tokens")
    running.cancel()  # as good as dead: its lease stays in processing:w1, its heartbeat stops
    await asyncio.gather(running, return_exceptions=True)
    await registry.mark_gone(redis, "w1")  # its heartbeat expired
    assert await redis.llen(keys.processing_key("w1")) == 1

    async with _serving(w2):  # the reaper hands the job to w2, which resumes it
        text, result = await _followed(redis, request_id)
    assert text == result.output == EXPECTED
    assert result.resumed is not None and not result.resumed.exact  # sampled: said so
    assert "temperature" in result.resumed.note


class _UnreachableBackend(FakeBackend):
    """A backend whose server went away: every generation fails as unreachable until `restore()`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def restore(self) -> None:
        self.down = False

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        if self.down:
            raise BackendUnavailable("cannot reach the model server: connection refused")
        async for item in super().generate(job):
            yield item


async def test_a_job_whose_backend_is_down_fails_over_and_the_worker_turns_unhealthy(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Admission would see the change of state up to one snapshot's life later: read the pool every time.
    monkeypatch.setattr(pool_snapshot_module, "SNAPSHOT_STALE_MAX_S", 0.0)
    backend = _UnreachableBackend()
    w1 = await fake_worker("w1", backend=backend, health_interval_s=0.2, health_timeout_s=1)
    request_id = await _submit(api)
    w2 = await fake_worker("w2")
    async with _serving(w1):
        await eventually(lambda: _state_is(api, "w1", "unhealthy"), "w1 to report itself unhealthy")
        row = next(w for w in (await api.get("/workers")).json() if w["worker_id"] == "w1")
        assert "connection refused" in row["state_reason"]
        assert await redis.llen(keys.queue_key("w2")) == 1  # handed on, not failed
        # New work avoids the unhealthy worker.
        assert (await api.post("/inference", json={"model": "fake", "prompt": "x"})).json()["worker_id"] == "w2"
        await w2.run(asyncio.Event(), burst=True)
        result = (await api.get(f"/result/{request_id}")).json()
        assert result["status"] == "completed" and result["worker_id"] == "w2"
        assert result["usage"]["completion_tokens"] == len(WORDS) + 1

        backend.restore()  # once its backend generates again, it serves
        await eventually(lambda: _state_is(api, "w1", "alive"), "w1 to be healthy again")


class _HangingBackend(FakeBackend):
    """Lists its model, but a generation never yields a token: what a wedged Ollama looks like."""

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        await asyncio.Event().wait()
        yield TokenChunk(text="never")  # pragma: no cover


async def test_a_backend_that_lists_models_but_cannot_generate_is_unhealthy(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    w1 = await fake_worker("w1", backend=_HangingBackend(), health_interval_s=0.2, health_timeout_s=0.3)
    assert await w1.backend.list_models() == ["fake"]
    started = time.monotonic()
    async with _serving(w1):
        await eventually(lambda: _state_is(api, "w1", "unhealthy"), "the probe to find the hang")
        assert time.monotonic() - started < 5
        row = next(w for w in (await api.get("/workers")).json() if w["worker_id"] == "w1")
        assert row["state_reason"] and "deadline" in row["state_reason"]
        refused = await api.post("/inference", json={"model": "fake", "prompt": "x"})
        assert refused.status_code == 503  # its only worker is unhealthy: no job goes to it


async def test_an_idle_consumer_blocks_long_yet_takes_a_job_at_once_stops_at_once_and_hands_on_what_it_left(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    """A consumer idle for `idle_after_s` blocks `idle_pop_timeout_s` at a time (here 60 s, from the
    start): a job still wakes it at once, and a stop ends the block rather than wait it out. A take
    cut off by the stop may already have moved a job into the worker's processing list in Redis, for
    no one to run: such an entry (made here by a take in w1's name, of a shared job of a model w1 does
    not serve, so its own consumer never takes it) is handed on by the drain, not left behind."""
    w1 = await fake_worker("w1")
    w1.idle_after_s, w1.idle_pop_timeout_s = 0.0, 60.0
    w1.link.orphan_check_s = 60.0  # its own orphan check must not take the entry back first
    stop = asyncio.Event()
    running = asyncio.create_task(w1.run(stop))
    try:
        request_id = await _submit(api)
        result = (await api.get(f"/result/{request_id}", params={"wait": 10})).json()
        assert result["status"] == "completed" and result["output"] == EXPECTED

        async def blocked() -> bool:  # its consumer waits on its doorbells again (other tests share the server)
            return any("b" in c["flags"] and c["db"] == str(TEST_DB) for c in await redis.client_list())

        await eventually(blocked, "w1's consumer to block again")
        orphan = Job(request_id="r-orphan", worker_id="", model="m2", prompt="p", enqueued_at=time.time(), shared=True)
        await queue.enqueue(redis, orphan, ttl_s=60)
        assert await queue.pop(redis, "w1", timeout_s=1, models=["m2"], result_ttl_s=60) is not None
        assert await redis.lrange(keys.processing_key("w1"), 0, -1) == ["r-orphan"]
    finally:
        stop.set()
    await asyncio.wait_for(running, timeout=10)  # not the 60 s block
    assert await redis.lrange(keys.processing_key("w1"), 0, -1) == []
    assert await redis.lrange(keys.model_queue_key("m2", cell=0), 0, -1) == ["r-orphan"]


async def test_a_failing_backend_cuts_idle_blocks_off_and_what_they_left_goes_to_another_worker(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    """A worker found unhealthy while its consumers sit in their long idle blocks (here 60 s) cuts
    them off rather than take jobs for a backend that fails. What a take cut off may have moved into
    its processing list (made here by a take in w1's name) is queued again by its orphan check and
    handed on with w1's queue at its next failed probe: w2 runs it."""
    backend = _UnreachableBackend()
    w1 = await fake_worker("w1", backend=backend, health_interval_s=0.2, health_timeout_s=1)
    w1.idle_after_s, w1.idle_pop_timeout_s = 0.0, 60.0
    w1.link.orphan_check_s = 0.2
    w2 = await fake_worker("w2")

    async def blocked_in_take() -> bool:  # other tests share the server: only this database's clients
        return any("b" in c["flags"] and c["db"] == str(TEST_DB) for c in await redis.client_list())

    async def unblocked() -> bool:
        return not await blocked_in_take()

    async with _serving(w1):
        await eventually(lambda: _state_is(api, "w1", "unhealthy"), "w1 to find its backend down")
        await eventually(unblocked, "w1's consumer to give up its 60 s block")
        job = Job(request_id="r-left", worker_id="w1", model="fake", prompt="p", enqueued_at=time.time())
        await queue.enqueue(redis, job, ttl_s=60)
        assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None  # an orphan of w1's
        async with _serving(w2):
            result = (await api.get("/result/r-left", params={"wait": 10})).json()
    assert result["status"] == "completed" and result["worker_id"] == "w2"
