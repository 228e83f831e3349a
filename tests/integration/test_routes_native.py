"""The seed's HTTP API, in process against a real Redis, with workers on the fake backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import keys
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.app import create_app
from gputorrent.embedded import free_port
from gputorrent.worker.backends.fake import FAIL_TRIGGER
from gputorrent.worker.main import Worker

MakeWorker = Callable[..., Awaitable[Worker]]


async def _submit(api: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await api.post("/inference", json={"model": "fake", "prompt": "hello pool", **body})


async def test_submit_then_result_goes_from_queued_to_completed(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    worker = await fake_worker("w1")
    accepted = await _submit(api, options={"max_tokens": 10})
    assert accepted.status_code == 202
    body = accepted.json()
    assert body["status"] == "queued" and body["worker_id"] == "w1" and len(body["request_id"]) == 32

    pending = await api.get(f"/result/{body['request_id']}")
    assert pending.status_code == 202
    assert pending.json()["status"] == "queued"

    await worker.run(asyncio.Event(), burst=True)
    done = await api.get(f"/result/{body['request_id']}")
    assert done.status_code == 200
    result = done.json()
    assert result["status"] == "completed"
    assert result["output"] == "echo: hello pool"
    assert result["model"] == "fake" and result["worker_id"] == "w1"
    assert result["usage"] == {"prompt_tokens": 2, "completion_tokens": 3}
    assert set(result["timings"]) >= {"queued_ms", "inference_ms"}


async def test_chat_messages_are_served(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    worker = await fake_worker("w1")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    accepted = (await api.post("/inference", json={"model": "fake", "messages": messages})).json()
    await worker.run(asyncio.Event(), burst=True)
    assert (await api.get(f"/result/{accepted['request_id']}")).json()["output"] == "echo: hi there"


@pytest.mark.parametrize("coordinator_settings", [{"routing": "round_robin"}], indirect=True)
async def test_round_robin_alternates_between_workers_with_worker_index(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    await fake_worker("w2")
    picked = [(await _submit(api)).json()["worker_id"] for _ in range(4)]
    assert picked == ["w1", "w2", "w1", "w2"]
    assert await redis.get(keys.worker_index()) == "4"
    assert await redis.llen(keys.queue_key("w1")) == 2
    assert await redis.llen(keys.queue_key("w2")) == 2


async def test_only_workers_serving_the_model_get_its_jobs(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1", "model-a")
    await fake_worker("w2", "model-b")
    picked = {
        (await api.post("/inference", json={"model": "model-b", "prompt": "p"})).json()["worker_id"] for _ in range(3)
    }
    assert picked == {"w2"}


async def test_unknown_model_is_404_listing_served_models_and_enqueues_nothing(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await fake_worker("w1")
    response = await api.post("/inference", json={"model": "nope", "prompt": "p"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["available_models"] == ["fake"]
    assert "nope" in error["message"]
    assert await redis.llen(keys.queue_key("w1")) == 0


async def test_no_live_worker_is_503_saying_so(api: httpx.AsyncClient) -> None:
    response = await _submit(api)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_workers"
    assert "no live worker" in response.json()["error"]["message"]


async def test_a_dead_worker_gets_no_jobs(api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis) -> None:
    await fake_worker("w1")
    await fake_worker("w2", "other")
    await redis.delete(keys.heartbeat_key("w1"))  # its heartbeat expired
    response = await _submit(api)
    assert response.status_code == 503
    assert "no live worker serves model 'fake'" in response.json()["error"]["message"]
    workers = {w["worker_id"]: w["state"] for w in (await api.get("/workers")).json()}
    assert workers == {"w1": "dead", "w2": "alive"}


async def test_malformed_bodies_are_422_naming_the_field(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    missing = await api.post("/inference", json={"prompt": "p"})
    assert missing.status_code == 422
    assert missing.json()["error"]["fields"] == [{"field": "model", "message": "Field required"}]
    bad_option = await _submit(api, options={"max_tokens": "many"})
    assert bad_option.status_code == 422
    assert bad_option.json()["error"]["fields"][0]["field"] == "options.max_tokens"
    both = await _submit(api, messages=[{"role": "user", "content": "x"}])
    assert both.status_code == 422
    assert "exactly one of 'prompt' or 'messages'" in both.json()["error"]["message"]
    not_json = await api.post("/inference", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 422
    assert not_json.json()["error"]["fields"][0]["field"] == "body"


async def test_an_over_large_body_is_413(api: httpx.AsyncClient, coordinator_settings: CoordinatorSettings) -> None:
    prompt = "x" * (coordinator_settings.max_body_bytes + 1)
    declared = await api.post("/inference", json={"model": "fake", "prompt": prompt})
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    async def chunks() -> object:  # no content-length: the limit counts the bytes as they arrive
        body = json.dumps({"model": "fake", "prompt": prompt}).encode()
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    streamed = await api.post("/inference", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


async def test_unknown_request_id_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/result/0123456789abcdef")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "request_not_found"


async def test_a_failed_job_is_200_with_status_failed_and_an_error(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    worker = await fake_worker("w1")
    request_id = (await _submit(api, prompt=f"please {FAIL_TRIGGER}")).json()["request_id"]
    await worker.run(asyncio.Event(), burst=True)
    response = await api.get(f"/result/{request_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "backend_error"
    assert "asked to fail" in body["error"]["message"]


async def test_wait_returns_as_soon_as_the_result_is_written(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    worker = await fake_worker("w1")
    request_id = (await _submit(api)).json()["request_id"]
    waiting = asyncio.create_task(api.get(f"/result/{request_id}", params={"wait": 20}))
    await asyncio.sleep(0)  # let the request start waiting before the worker runs
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.run(asyncio.Event(), burst=True)
    response = await asyncio.wait_for(waiting, 10)
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert loop.time() - started < 5  # woken by the notification, not by the 20 s bound


async def test_wait_gives_the_status_when_the_bound_passes(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    request_id = (await _submit(api)).json()["request_id"]
    response = await api.get(f"/result/{request_id}", params={"wait": 0.2})
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert (await api.get(f"/result/{request_id}", params={"wait": -1})).status_code == 422


async def test_the_result_expires_after_its_ttl(api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis) -> None:
    worker = await fake_worker("w1")
    request_id = (await _submit(api)).json()["request_id"]
    await worker.run(asyncio.Event(), burst=True)
    ttl = await redis.ttl(keys.result_key(request_id))
    assert 3500 < ttl <= 3600
    assert not await redis.exists(keys.job_key(request_id))


async def test_workers_lists_models_state_load_and_queue(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    await _submit(api)
    [worker] = (await api.get("/workers")).json()
    assert worker["worker_id"] == "w1"
    assert worker["models"] == ["fake"]
    assert worker["state"] == "alive"
    assert worker["queue_length"] == 1
    assert worker["jobs_in_flight"] == 0
    assert worker["backend"] == "fake"


async def test_workers_are_read_a_page_at_a_time(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    for worker_id in ("w3", "w1", "w2"):
        await fake_worker(worker_id)

    async def page(**params: object) -> list[str]:
        response = await api.get("/workers", params=params)
        assert response.status_code == 200, response.text
        return [w["worker_id"] for w in response.json()]

    assert await page() == ["w1", "w2", "w3"]
    assert await page(limit=2) == ["w1", "w2"]
    assert await page(limit=2, after="w2") == ["w3"]
    assert await page(after="w0") == ["w1", "w2", "w3"]  # any text: the ids that sort after it
    assert await page(after="w3") == []
    bad = await api.get("/workers", params={"limit": 0})
    assert bad.status_code == 422
    assert bad.json()["error"]["fields"][0]["field"] == "limit"


async def test_health_is_200_with_redis(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "redis": "connected"}


async def test_without_redis_health_is_503_and_inference_503_not_500() -> None:
    settings = CoordinatorSettings(redis_url=f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://c") as api:
        health = await api.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "unhealthy", "redis": "disconnected"}
        key = "gt_0123456789ab_" + "k" * 43  # checking any key needs Redis too
        submit = await api.post(
            "/inference", json={"model": "fake", "prompt": "p"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert submit.status_code == 503
        assert submit.json()["error"]["code"] == "redis_unavailable"
        assert submit.headers["retry-after"] == "1"


async def test_text_that_cannot_be_encoded_is_422_not_500(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    body = b'{"model": "fake", "prompt": "\\ud800"}'  # a lone surrogate escape: valid JSON, not valid Unicode
    response = await api.post("/inference", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "prompt"


async def test_wait_must_be_a_finite_number(api: httpx.AsyncClient) -> None:
    for value in ("nan", "inf", "abc"):
        response = await api.get("/result/r", params={"wait": value})
        assert response.status_code == 422
        assert response.json()["error"]["fields"][0]["field"] == "wait"


async def test_unknown_routes_and_methods_answer_in_the_same_error_shape(api: httpx.AsyncClient) -> None:
    missing = await api.get("/no-such-route")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    wrong_method = await api.delete("/inference")
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (405, "method_not_allowed")


async def test_a_stream_without_a_result_in_time_ends_with_an_error_event(
    coordinator_settings: CoordinatorSettings, fake_worker: MakeWorker, admin_key: str
) -> None:
    await fake_worker("w1")  # registered, never run: the job waits in its queue
    app = create_app(coordinator_settings.model_copy(update={"max_sync_wait_s": 0.5}))
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {admin_key}"}
    client = httpx.AsyncClient(transport=transport, base_url="http://c", headers=headers)
    async with app.router.lifespan_context(app), client:
        native = await client.post("/inference", json={"model": "fake", "prompt": "p", "stream": True})
        assert native.text.startswith("event: queued")
        assert "event: error" in native.text and "result_timeout" in native.text
        chat = {"model": "fake", "messages": [{"role": "user", "content": "p"}], "stream": True}
        openai = await client.post("/v1/chat/completions", json=chat)
        last = [line for line in openai.text.splitlines() if line.startswith("data: ")][-1]
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == "result_timeout"


async def test_an_over_large_body_on_the_openai_routes_is_413_in_openais_shape(
    api: httpx.AsyncClient, coordinator_settings: CoordinatorSettings
) -> None:
    content = "x" * (coordinator_settings.max_body_bytes + 1)
    response = await api.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "request_too_large"


async def test_a_body_sent_as_a_form_or_without_content_type_is_read_as_json(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    """`curl -d` labels JSON as a form; Ollama's docs post that way and Ollama reads it as JSON."""
    await fake_worker("w1")
    body = b'{"model": "fake", "prompt": "p"}'
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        response = await api.post("/inference", content=body, headers={"content-type": content_type})
        assert response.status_code == 202, response.text
    bare = await api.post("/inference", content=body)
    assert bare.status_code == 202, bare.text


async def test_redis_refusing_writes_is_503_not_500(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    """Redis runs with noeviction: when full it refuses writes (OOM), which clients see as 503."""
    await fake_worker("w1")
    await redis.config_set("maxmemory", "1")
    try:
        response = await _submit(api)
    finally:
        await redis.config_set("maxmemory", "0")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "redis_unavailable"


async def test_the_root_answers_get_and_head_as_ollamas_does(api: httpx.AsyncClient) -> None:
    assert (await api.get("/")).text == "GPU Torrent is running"
    assert (await api.get("/", headers={"Accept": "application/json"})).text == "GPU Torrent is running"
    assert (await api.head("/")).status_code == 200


async def test_a_browser_opening_the_root_lands_on_the_dashboard(api: httpx.AsyncClient) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    redirected = await api.get("/", headers=browser)
    assert redirected.status_code == 307 and redirected.headers["location"] == "/dashboard"
    page = await api.get("/", headers=browser, follow_redirects=True)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
