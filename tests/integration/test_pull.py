"""`POST /api/pull` onto workers, in process: a pull is a job for each live worker whose backend can
pull, its progress is relayed line by line, and the model is listed before success is told.

The workers that pull run the `ollama` backend against a stand-in for Ollama's documented protocol —
NOT a real Ollama (see tests/ollama_standin.py); one stand-in per worker, as each is its own machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import auth, keys, queue
from gputorrent.coordinator.reaper import Reaper
from gputorrent.protocol import Job, Taken
from gputorrent.worker.backends.ollama import OllamaBackend
from gputorrent.worker.main import Worker
from tests.ollama_standin import CHAT_REPLY, PULL_NOT_FOUND, OllamaProtocolStandin

MakeWorker = Callable[..., Awaitable[Worker]]
MakeOllamaWorker = Callable[[str, OllamaProtocolStandin], Awaitable[Worker]]
StartStandin = Callable[..., Awaitable[OllamaProtocolStandin]]
NEW_MODEL = "qwen2.5:0.5b"  # in every stand-in's registry, on no stand-in at first


@pytest.fixture
async def standins() -> AsyncIterator[StartStandin]:
    """Start stand-ins for Ollama (NOT Ollama) on this test's loop; stopped at teardown."""
    started: list[OllamaProtocolStandin] = []

    async def start(**fields: Any) -> OllamaProtocolStandin:
        standin = OllamaProtocolStandin(**fields)
        await standin.start()
        started.append(standin)
        return standin

    yield start
    for standin in started:
        await standin.stop()


@contextlib.asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[None]:
    """The workers consume while the block runs, then drain and leave."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)


@pytest.fixture
async def ollama_worker(fake_worker: MakeWorker) -> AsyncIterator[MakeOllamaWorker]:
    """Register in-process workers on the `ollama` backend, each on its own stand-in; their backends
    are closed at teardown."""
    backends: list[OllamaBackend] = []

    async def make(worker_id: str, standin: OllamaProtocolStandin) -> Worker:
        backends.append(OllamaBackend(host=standin.url))
        return await fake_worker(worker_id, model="llama3.2", backend=backends[-1])

    yield make
    for backend in backends:
        await backend.close()


def _lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines() if line]


async def _models_of(api: httpx.AsyncClient) -> dict[str, list[str]]:
    return {w["worker_id"]: w["models"] for w in (await api.get("/workers")).json()}


async def test_a_pull_runs_on_each_ollama_worker_with_its_progress_and_lists_the_model_documented_protocol(
    api: httpx.AsyncClient, fake_worker: MakeWorker, ollama_worker: MakeOllamaWorker, standins: StartStandin
) -> None:
    first, second = await standins(), await standins()
    workers = [await ollama_worker("wa", first), await ollama_worker("wb", second)]
    workers.append(await fake_worker("wf"))  # its backend cannot pull: it gets no pull job
    async with running(*workers):
        lines = _lines(await api.post("/api/pull", json={"model": NEW_MODEL}, timeout=60))

        assert lines[-1] == {"status": "success"}
        assert [line["status"] for line in lines].count("success") == 1
        for worker_id in ("wa", "wb"):
            own = [line for line in lines if line.get("worker") == worker_id]
            assert own[0]["status"] == f"queued on worker {worker_id}"
            assert own[-1]["status"] == f"pulled onto worker {worker_id}"
            statuses = [line["status"] for line in own]
            assert "pulling manifest" in statuses and "verifying sha256 digest" in statuses
            downloads = [line for line in own if "digest" in line]
            assert downloads and all(line["total"] == 4000 for line in downloads)
            assert [line["completed"] for line in downloads if "completed" in line] == [1000, 2500, 4000]
        assert not any(line.get("worker") == "wf" for line in lines)
        for standin in (first, second):
            assert [r.body for r in standin.requests_to("/api/pull")] == [{"model": NEW_MODEL, "stream": True}]

        # Listed before success was told: routing and the model listings see it at once.
        models = await _models_of(api)
        assert NEW_MODEL in models["wa"] and NEW_MODEL in models["wb"] and NEW_MODEL not in models["wf"]
        assert NEW_MODEL in [m["name"] for m in (await api.get("/api/tags")).json()["models"]]
        can_pull = {w["worker_id"]: w["can_pull"] for w in (await api.get("/workers")).json()}
        assert can_pull == {"wa": True, "wb": True, "wf": False}
        reply = await api.post("/api/generate", json={"model": NEW_MODEL, "prompt": "hi", "stream": False}, timeout=30)
        assert reply.status_code == 200 and reply.json()["response"] == CHAT_REPLY

        # Served by every worker that can pull now: success at once, no job, nothing downloaded.
        again = _lines(await api.post("/api/pull", json={"name": NEW_MODEL}))
        assert again == [{"status": "success"}]
        assert len(first.requests_to("/api/pull")) == 1


async def test_a_pull_that_fails_on_one_worker_names_it_and_never_says_success_documented_protocol(
    api: httpx.AsyncClient, ollama_worker: MakeOllamaWorker, standins: StartStandin
) -> None:
    has_it, lacks_it = await standins(), await standins(registry=set())
    workers = [await ollama_worker("wa", has_it), await ollama_worker("wb", lacks_it)]
    async with running(*workers):
        lines = _lines(await api.post("/api/pull", json={"model": NEW_MODEL}, timeout=60))
        assert "success" not in [line.get("status") for line in lines]
        assert lines[-1] == {"error": f"the pull of '{NEW_MODEL}' failed on worker wb: "
                                      f"Ollama could not pull '{NEW_MODEL}': {PULL_NOT_FOUND}"}  # fmt: skip
        assert {"status": "pulled onto worker wa", "worker": "wa"} in lines
        models = await _models_of(api)
        assert NEW_MODEL in models["wa"] and NEW_MODEL not in models["wb"]

        # Without streaming: one error object, with the failed job's status (502: the model is unavailable).
        whole = await api.post("/api/pull", json={"model": "other:1b", "stream": False}, timeout=60)
        assert whole.status_code == 502
        assert whole.json() == {
            "error": "the pull of 'other:1b' failed on workers wa, wb: "
            f"wa: Ollama could not pull 'other:1b': {PULL_NOT_FOUND}; wb: Ollama could not pull 'other:1b': "
            f"{PULL_NOT_FOUND}"
        }


@pytest.mark.parametrize("coordinator_settings", [{"heartbeat_timeout_s": 600}], indirect=True)  # never beat
async def test_only_an_admin_key_starts_a_download_any_client_key_pulls_a_served_model(
    api: httpx.AsyncClient,
    redis: Redis,
    ollama_worker: MakeOllamaWorker,
    standins: StartStandin,
) -> None:
    standin = await standins()
    await ollama_worker("wa", standin)  # registered (and alive) without running: no job is taken
    _, client_key = await auth.create_key(redis, "laptop", "client")
    as_client = {"Authorization": f"Bearer {client_key}"}

    refused = await api.post("/api/pull", json={"model": NEW_MODEL}, headers=as_client)
    assert refused.status_code == 403
    assert refused.json() == {"error": f"pulling '{NEW_MODEL}' would download it onto 1 worker(s) (wa): "
                                       "that needs an admin key"}  # fmt: skip
    assert standin.requests_to("/api/pull") == [] and await redis.llen(keys.queue_key("wa")) == 0

    served = await api.post("/api/pull", json={"model": "llama3.2", "stream": False}, headers=as_client)
    assert (served.status_code, served.json()) == (200, {"status": "success"})


@pytest.mark.parametrize("coordinator_settings", [{"heartbeat_timeout_s": 600}], indirect=True)  # never beat
async def test_a_pool_where_no_worker_can_pull_answers_503_naming_the_backends(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    nobody = await api.post("/api/pull", json={"model": NEW_MODEL})
    assert nobody.status_code == 503
    assert nobody.json() == {"error": "no live worker is registered; start one with `gputorrent worker`"}

    await fake_worker("wf")
    unable = await api.post("/api/pull", json={"model": NEW_MODEL})
    assert unable.status_code == 503
    assert unable.json()["error"] == (
        f"no live worker can pull '{NEW_MODEL}': their backends (fake) cannot fetch it (the ollama backend pulls "
        "from its registry; the llamacpp backend only models in the pool's catalogue, `GET /swarm/catalogue`); "
        f"start a worker with --backend ollama, or one with --model {NEW_MODEL}"
    )
    served = await api.post("/api/pull", json={"model": "fake:latest", "stream": False})
    assert (served.status_code, served.json()) == (200, {"status": "success"})
    for bad in ({}, {"model": "two words"}, {"model": "m", "insecure": "maybe"}):
        refused = await api.post("/api/pull", json=bad)
        assert refused.status_code == 400 and list(refused.json()) == ["error"], refused.text


def _pull_job(request_id: str, worker_id: str) -> Job:
    now = time.time()
    return Job(
        request_id=request_id, worker_id=worker_id, model=NEW_MODEL, kind="pull", enqueued_at=now, deadline=now + 60
    )


@pytest.mark.parametrize("coordinator_settings", [{"heartbeat_timeout_s": 600}], indirect=True)  # never beat
async def test_a_dead_workers_pull_waits_for_that_worker_and_is_not_handed_to_another(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    for worker_id in ("wa", "wb"):  # wb even serves the model: a pull is still wa's alone
        body = {"worker_id": worker_id, "models": [NEW_MODEL], "backend": "ollama", "can_pull": True}
        assert (await api.post("/register", json=body)).status_code == 200
    await queue.enqueue(redis, _pull_job("pull-0001", "wa"), ttl_s=60)
    assert await queue.pop(redis, "wa", timeout_s=1, result_ttl_s=60) is not None
    await queue.enqueue(redis, _pull_job("pull-0002", "wa"), ttl_s=60)
    await redis.delete(keys.heartbeat_key("wa"))  # wa died holding one pull, with another queued

    await Reaper(redis, interval_s=0.1, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=0).reap_once()
    assert await redis.llen(keys.processing_key("wa")) == 1 and await redis.llen(keys.queue_key("wa")) == 1
    assert await redis.llen(keys.queue_key("wb")) == 0

    # wa restarts under its id: both pulls are queued for it again (Ollama resumes a download).
    assert await queue.recover(redis, "wa", max_attempts=3, ttl_s=60) == 1
    assert await redis.llen(keys.queue_key("wa")) == 2


@pytest.mark.parametrize("coordinator_settings", [{"heartbeat_timeout_s": 600}], indirect=True)  # never beat
async def test_a_worker_without_redis_lists_only_the_model_of_a_pull_it_holds(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    credentials = {}
    for worker_id in ("wa", "wb"):
        body = {"worker_id": worker_id, "models": ["llama3.2"], "backend": "ollama", "can_pull": True}
        registered = (await api.post("/register", json=body)).json()
        credentials[worker_id] = {"Authorization": f"Bearer {worker_id}:{registered['worker_secret']}"}
    await queue.enqueue(redis, _pull_job("pull-0001", "wa"), ttl_s=60)
    taken = await api.post("/worker/take", params={"wait_s": 0}, headers=credentials["wa"])
    assert Taken.model_validate_json(taken.content).job.kind == "pull"

    not_its_own = await api.post("/worker/jobs/pull-0001/pulled", headers=credentials["wb"])
    assert not_its_own.status_code == 409 and not_its_own.json()["error"]["code"] == "lease_lost"
    assert (await api.post("/worker/jobs/pull-0001/pulled", headers=credentials["wa"])).status_code == 204
    assert (await _models_of(api)) == {"wa": ["llama3.2", NEW_MODEL], "wb": ["llama3.2"]}

    await api.post("/inference", json={"model": "llama3.2", "prompt": "hi"})
    generation = Taken.model_validate_json(
        (await api.post("/worker/take", params={"wait_s": 0}, headers=credentials["wb"])).content
    ).job
    not_a_pull = await api.post(f"/worker/jobs/{generation.request_id}/pulled", headers=credentials["wb"])
    assert not_a_pull.status_code == 409 and not_a_pull.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize("coordinator_settings", [{"routing": "pull"}], indirect=True)
async def test_under_pull_routing_a_worker_takes_the_jobs_of_a_model_it_pulled_documented_protocol(
    api: httpx.AsyncClient, ollama_worker: MakeOllamaWorker, standins: StartStandin
) -> None:
    worker = await ollama_worker("wa", await standins())
    async with running(worker):
        pulled = await api.post("/api/pull", json={"model": NEW_MODEL, "stream": False}, timeout=60)
        assert (pulled.status_code, pulled.json()) == (200, {"status": "success"})
        assert worker.models == ["llama3.2", NEW_MODEL]
        # The job waits on the model's shared queue: only a worker that takes from it can answer.
        reply = await api.post("/api/generate", json={"model": NEW_MODEL, "prompt": "hi", "stream": False}, timeout=30)
        assert reply.status_code == 200 and reply.json()["response"] == CHAT_REPLY
