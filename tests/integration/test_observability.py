"""/metrics, /pool, the pages, the pool's history in Redis and the worker's telemetry, on the app in process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gputorrent import auth, keys, pool_stats
from gputorrent.telemetry import FailureRecord
from gputorrent.worker.main import Worker
from tests.conftest import eventually

MakeWorker = Callable[..., Awaitable[Worker]]


async def _requests_total(api: httpx.AsyncClient) -> dict[tuple[str, str, str], float]:
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.labels["route"], s.labels["model"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(response.text)
        if family.name == "gputorrent_requests"
        for s in family.samples
        if s.name == "gputorrent_requests_total"
    }


async def test_request_counters_move_by_route_model_and_status(api: httpx.AsyncClient, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    before = await _requests_total(api)

    assert (await api.post("/inference", json={"model": "fake", "prompt": "hi"})).status_code == 202
    assert (await api.post("/inference", json={"model": "made-up-model", "prompt": "hi"})).status_code == 404
    assert (await api.post("/inference", json={"model": "fake"})).status_code == 422
    assert (await api.get("/no/such/path/123")).status_code == 404

    after = await _requests_total(api)
    moved = {labels: after[labels] - before.get(labels, 0) for labels in after if after[labels] != before.get(labels)}
    assert moved == {
        ("/inference", "fake", "202"): 1,
        ("/inference", "", "404"): 1,  # a model nobody serves never becomes a label value
        ("/inference", "", "422"): 1,
        ("unmatched", "", "404"): 1,
        ("/metrics", "", "200"): 1,  # the first scrape, counted once it answered
    }


async def test_the_pool_series_come_from_the_heartbeats_in_redis(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    accepted = (await api.post("/inference", json={"model": "fake", "prompt": "one two three"})).json()
    await worker.run(asyncio.Event(), burst=True)
    assert (await api.get(f"/result/{accepted['request_id']}")).json()["status"] == "completed"
    # The burst run left the pool; register it again with the heartbeat it would send now.
    await fake_worker("w1")
    await redis.set(keys.heartbeat_key("w1"), worker.heartbeat().model_dump_json(), px=5000)

    text = (await api.get("/metrics")).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = frozenset({("model", "fake"), ("worker", "w1")})
    assert samples[("gputorrent_jobs_total", labels | {("status", "completed")})] == 1
    assert samples[("gputorrent_tokens_generated_total", labels)] == 4  # "echo:" and three words
    assert samples[("gputorrent_time_to_first_token_seconds_count", labels)] == 1
    assert samples[("gputorrent_request_latency_seconds_count", labels)] == 1
    assert samples[("gputorrent_workers", frozenset({("state", "alive")}))] == 1
    assert samples[("gputorrent_worker_slots", frozenset({("worker", "w1")}))] == 1


async def test_a_scrape_without_per_worker_series_counts_the_pools_jobs_by_model(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    await redis.set(keys.heartbeat_key("w1"), worker.heartbeat().model_dump_json(), px=5000)
    first = (await api.get("/metrics", params={"per_worker": "false"})).text  # where w1 stands: no job yet
    assert "gputorrent_worker_slots" not in first and 'worker="w1"' not in first

    accepted = (await api.post("/inference", json={"model": "fake", "prompt": "one two three"})).json()
    await worker.run(asyncio.Event(), burst=True)
    assert (await api.get(f"/result/{accepted['request_id']}")).json()["status"] == "completed"
    await fake_worker("w1")  # the burst run left the pool: back, with the heartbeat it would send now
    await redis.set(keys.heartbeat_key("w1"), worker.heartbeat().model_dump_json(), px=5000)

    text = (await api.get("/metrics", params={"per_worker": "false"})).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("gputorrent_pool_jobs_total", frozenset({("model", "fake"), ("status", "completed")}))] == 1
    assert samples[("gputorrent_pool_tokens_generated_total", frozenset({("model", "fake")}))] == 4
    assert samples[("gputorrent_pool_slots", frozenset())] == 1
    assert not any("worker" in dict(labels) for _, labels in samples)


async def test_a_worker_adds_what_it_finished_to_the_pool_history(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    worker = await fake_worker("w1")
    for prompt in ("a b", "c d e", "__fail__ please"):
        assert (await api.post("/inference", json={"model": "fake", "prompt": prompt})).status_code == 202
    await worker.run(asyncio.Event(), burst=True)  # flushes its figures once more as it stops

    history = await pool_stats.history(redis, 60, now=time.time() + pool_stats.BUCKET_S)
    totals = {
        "jobs": sum(p.jobs_per_s for p in history) * pool_stats.BUCKET_S,
        "failed": sum(p.failed_per_s for p in history) * pool_stats.BUCKET_S,
        "tokens": sum(p.tokens_per_s for p in history) * pool_stats.BUCKET_S,
    }
    assert totals == {"jobs": 3, "failed": 1, "tokens": 3 + 4}
    assert any(p.ttft_avg_s is not None and p.ttft_avg_s >= 0 for p in history)
    [failure] = await pool_stats.recent_failures(redis)
    assert (failure.worker_id, failure.code, failure.model) == ("w1", "backend_error", "fake")


async def test_the_pool_overview_shows_failures_to_admins_only(api: httpx.AsyncClient, redis: Redis) -> None:
    await pool_stats.record_failure(
        redis, FailureRecord(at=time.time(), request_id="r-1", model="m", worker_id="w", code="timeout", message="late")
    )
    as_admin = (await api.get("/pool", params={"history_s": 60})).json()
    assert [f["code"] for f in as_admin["failures"]] == ["timeout"]
    assert len(as_admin["history"]) == 60 // pool_stats.BUCKET_S
    assert as_admin["totals"] == {
        "workers": {"alive": 0, "draining": 0, "unhealthy": 0, "dead": 0}, "slots": 0, "slots_busy": 0, "queued": 0,
        "in_flight": 0,
    }  # fmt: skip

    _, client_key = await auth.create_key(redis, "a client", "client")
    as_client = await api.get("/pool", headers={"Authorization": f"Bearer {client_key}"})
    assert as_client.status_code == 200 and as_client.json()["failures"] is None
    assert (await api.get("/pool", headers={"Authorization": "Bearer nope"})).status_code == 401


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/pool", {"history_s": "lots"}, "history_s"),
        ("/pool", {"history_s": "1"}, "history_s"),
        ("/pool", {"history_s": str(pool_stats.HISTORY_S + 1)}, "history_s"),
        ("/pool/events", {"interval_s": "0"}, "interval_s"),
        ("/pool/events", {"interval_s": "nan"}, "interval_s"),
        ("/metrics", {"per_worker": "sometimes"}, "per_worker"),
    ],
)
async def test_bad_query_values_are_a_422_naming_the_field(
    api: httpx.AsyncClient, path: str, params: dict[str, str], field: str
) -> None:
    response = await api.get(path, params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and [f["field"] for f in error["fields"]] == [field]


async def test_the_pages_and_their_assets_are_served_without_a_key(api: httpx.AsyncClient) -> None:
    anonymous = httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url))
    async with anonymous:
        pages = [("/dashboard", "text/html"), ("/dashboard/playground", "text/html"),
                 ("/dashboard/assets/api.js", "javascript"), ("/dashboard/assets/style.css", "text/css")]  # fmt: skip
        for path, kind in pages:
            response = await anonymous.get(path)
            assert response.status_code == 200, path
            assert kind in response.headers["content-type"]
        page = await anonymous.get("/dashboard")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert 'src="/dashboard/assets/dashboard.js"' in page.text
        assert (await anonymous.get("/dashboard/assets/nothing.js")).status_code == 404
        assert (await anonymous.get("/metrics")).status_code == 401


async def test_a_job_the_reaper_times_out_is_listed_as_a_failure(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")  # registered, never run: the job waits in its queue past its deadline
    accepted = (await api.post("/inference", json={"model": "fake", "prompt": "hi", "timeout_s": 0.2})).json()

    async def listed() -> bool:
        failures = (await api.get("/pool", params={"history_s": 60})).json()["failures"]
        return [(f["request_id"], f["code"], f["worker_id"]) for f in failures] == [
            (accepted["request_id"], "timeout", "w1")
        ]

    await eventually(listed, "the reaper to end the job and list it")
