"""Admissions and stored results acknowledged once a replica has them (`WAIT`; replication.py), on real
servers: a primary, a replica and three Sentinels (tests/sentinel.py), and the suite's lone Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import keys, queue, redis_client, replication
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.app import create_app
from gputorrent.protocol import JobResult, WorkerRegistration
from gputorrent.worker.main import Worker
from tests.sentinel import RedisProcess, SentinelDeployment

SUBMISSIONS = 50
COUNTED = ("evalsha", "wait", "info")
STOPPED_BOUND_MS = 300
# What an answer may take beyond the bound on a loaded 2-core machine.
MARGIN_S = 1.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    with SentinelDeployment(tmp_path_factory.mktemp("replicated")) as started:
        yield started


def _replica(deployment: SentinelDeployment) -> RedisProcess:
    primary_port = deployment.primary_port()
    return next(s for s in deployment.servers if s.port != primary_port and s.running())


@contextlib.asynccontextmanager
async def _coordinator(deployment: SentinelDeployment, **settings_values: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process on the deployment, with a live worker registered (nothing takes its jobs)."""
    settings = CoordinatorSettings(redis_url=deployment.url, auth=False, heartbeat_timeout_s=120, **settings_values)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coordinator") as api:
            body = WorkerRegistration(worker_id="w-replicated", models=["fake"], backend="fake")
            assert (await api.post("/register", json=body.model_dump(mode="json"))).status_code == 200
            yield api


async def _submit(api: httpx.AsyncClient, prompt: str = "replicated") -> str:
    response = await api.post("/inference", json={"model": "fake", "prompt": prompt})
    assert response.status_code == 202, response.text
    return str(response.json()["request_id"])


async def test_every_202_comes_once_the_replica_has_the_job(deployment: SentinelDeployment) -> None:
    replica = _replica(deployment)
    async with _coordinator(deployment) as api:
        for i in range(SUBMISSIONS):
            request_id = await _submit(api, f"job {i}")
            assert replica.ask("EXISTS", keys.job_key(request_id)) == 1, f"submission {i} is not on the replica"


async def test_a_202_waits_while_the_replica_is_stopped_and_comes_when_it_has_the_job(
    deployment: SentinelDeployment,
) -> None:
    replica = _replica(deployment)
    async with _coordinator(deployment, wait_timeout_ms=20_000) as api:
        await _submit(api, "warm")  # the replica count is read, the scripts are loaded
        replica.process.send_signal(signal.SIGSTOP)
        try:
            submission = asyncio.ensure_future(_submit(api, "while stopped"))
            done, _ = await asyncio.wait([submission], timeout=1.0)
            assert not done, "a 202 came while the only replica could not have the job"
        finally:
            replica.process.send_signal(signal.SIGCONT)
        request_id = await asyncio.wait_for(submission, timeout=10)
        assert replica.ask("EXISTS", keys.job_key(request_id)) == 1


async def test_with_the_replica_stopped_an_admission_is_a_503_after_the_bound_and_its_retry_confirms_it(
    deployment: SentinelDeployment,
) -> None:
    """Past the bound the job is on the primary alone: not acknowledged (503 naming its request id, counted).
    The client's retry with that id, once the replica answers, is the 202, for the one job admitted."""
    replica = _replica(deployment)
    async with _coordinator(deployment, wait_timeout_ms=STOPPED_BOUND_MS) as api:
        await _submit(api, "warm")
        before = _unreplicated(await _metrics(api), "admission")
        refused: list[tuple[float, httpx.Response]] = []
        replica.process.send_signal(signal.SIGSTOP)
        try:
            for i in range(3):
                start = time.monotonic()
                response = await api.post("/inference", json={"model": "fake", "prompt": f"stopped {i}"})
                refused.append((time.monotonic() - start, response))
        finally:
            replica.process.send_signal(signal.SIGCONT)
        took = [t for t, _ in refused]
        assert all(STOPPED_BOUND_MS / 1000 <= t < STOPPED_BOUND_MS / 1000 + MARGIN_S for t in took), took
        assert [r.status_code for _, r in refused] == [503] * 3, [r.text for _, r in refused]
        assert all(r.headers["retry-after"] == "1" for _, r in refused)
        errors = [r.json()["error"] for _, r in refused]
        assert all(e["code"] == "redis_unavailable" and e["request_id"] in e["message"] for e in errors), errors
        assert _unreplicated(await _metrics(api), "admission") == before + 3
        request_id = errors[0]["request_id"]
        retried = await api.post("/inference", json={"model": "fake", "prompt": "stopped 0", "request_id": request_id})
        assert retried.status_code == 202, retried.text
        assert retried.json()["request_id"] == request_id
        assert replica.ask("EXISTS", keys.job_key(request_id)) == 1
        queued = replica.ask("LRANGE", keys.queue_key("w-replicated"), "0", "-1")
        assert isinstance(queued, list) and queued.count(request_id) == 1, "one job, not two"
        assert _unreplicated(await _metrics(api), "admission") == before + 3


async def test_a_stored_result_waits_for_the_replica_too(deployment: SentinelDeployment) -> None:
    redis = redis_client.async_client(deployment.url)
    replication.configure(redis, "auto", 20_000)
    replica = _replica(deployment)
    held_in = keys.processing_key("w-result")
    try:
        await redis.rpush(held_in, "r-stored")
        result = JobResult(request_id="r-stored", status="completed", model="fake", worker_id="w-result", output="done")
        replica.process.send_signal(signal.SIGSTOP)
        try:
            storing = asyncio.ensure_future(queue.finish(redis, held_in, result, 60, streamed=False))
            done, _ = await asyncio.wait([storing], timeout=1.0)
            assert not done, "the result was acknowledged while the only replica could not have it"
        finally:
            replica.process.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(storing, timeout=10) is True
        assert replica.ask("EXISTS", keys.result_key("r-stored")) == 1
    finally:
        await redis.aclose()


async def test_a_result_stored_past_the_bound_is_not_acknowledged_and_its_repeat_confirms_it(
    deployment: SentinelDeployment,
) -> None:
    """As a worker does: the store raises `Unreplicated` (the result is on the primary alone), the worker
    keeps the result and stores it again; the repeat finds it stored and answers once the replica has it."""
    redis = redis_client.async_client(deployment.url)
    replication.configure(redis, "auto", STOPPED_BOUND_MS)
    replica = _replica(deployment)
    held_in = keys.processing_key("w-repeat")
    result = JobResult(request_id="r-repeat", status="completed", model="fake", worker_id="w-repeat", output="done")
    try:
        await redis.rpush(held_in, "r-repeat")
        assert await queue.finish(redis, held_in, result, 60, streamed=False) is True  # the count is read
        await redis.rpush(held_in, "r-repeat-2")
        second = result.model_copy(update={"request_id": "r-repeat-2"})
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(replication.Unreplicated):
                await queue.finish(redis, held_in, second, 60, streamed=False)
        finally:
            replica.process.send_signal(signal.SIGCONT)
        assert await queue.finish(redis, held_in, second, 60, streamed=False) is True
        assert replica.ask("GET", keys.result_key("r-repeat-2")) == second.model_dump_json()
        other = second.model_copy(update={"output": "another"})  # not this store's repeat: the lease is gone
        assert await queue.finish(redis, held_in, other, 60, streamed=False) is False
    finally:
        await redis.aclose()


async def _metrics(api: httpx.AsyncClient) -> str:
    response = await api.get("/metrics")
    assert response.status_code == 200
    return response.text


def _unreplicated(exposition: str, write: str) -> float:
    prefix = f'gputorrent_unreplicated_writes_total{{write="{write}"}} '
    (line,) = [line for line in exposition.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


# -- a lone Redis: `auto` sends no WAIT with the writes --------------------------------------------------


async def test_auto_on_a_lone_redis_sends_no_wait_with_the_writes(
    api: httpx.AsyncClient, redis: Redis, fake_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await fake_worker("w-lone")

    async def calls() -> dict[str, int]:
        stats = await redis.info("commandstats")  # itself one INFO call
        return {command: int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in COUNTED}

    before = await calls()
    started = time.monotonic()
    for i in range(SUBMISSIONS):
        await _submit(api, f"lone {i}")
    elapsed_s = time.monotonic() - started
    sent = {command: count - before[command] for command, count in (await calls()).items()}
    assert sent["evalsha"] >= SUBMISSIONS
    assert sent["wait"] == 0
    # `auto` read the replica count (at most once a second); the other INFO is this test's own.
    assert 1 <= sent["info"] - 1 <= 1 + elapsed_s / replication.REFRESH_S, sent
