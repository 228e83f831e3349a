"""`CoordinatorLink` against a live coordinator (uvicorn in a thread): it stops when the pool no longer
knows the worker, retries an answer that is not the coordinator's, and never takes a slow take's
reply for a lost one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import httpx
import pytest
import uvicorn
from aiohttp import web
from redis.asyncio import Redis

from gputorrent import keys
from gputorrent.config import CoordinatorSettings, WorkerSettings
from gputorrent.coordinator.app import create_app
from gputorrent.embedded import free_port
from gputorrent.errors import WorkerGone
from gputorrent.protocol import Heartbeat, Registered, Taken
from gputorrent.worker.backends.fake import FakeBackend
from gputorrent.worker.coordinator_link import CoordinatorLink, CoordinatorUnreachable
from gputorrent.worker.main import Worker
from tests.conftest import wait_for


@pytest.fixture
def coordinator_url(coordinator_settings: CoordinatorSettings) -> Iterator[str]:
    settings = coordinator_settings.model_copy(update={"heartbeat_timeout_s": 600})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


async def _register(url: str, admin_key: str, worker_id: str) -> Registered:
    body = {"worker_id": worker_id, "models": ["fake"], "backend": "fake"}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}) as client:
        response = await client.post("/register", json=body)
    assert response.status_code == 200, response.text
    return Registered.model_validate(response.json())


async def _worker(url: str, registered: Registered) -> Worker:
    backend = FakeBackend()
    await backend.load("fake")
    settings = WorkerSettings(
        backend="fake", model_name="fake", worker_id=registered.worker_id, link="coordinator", coordinator_url=url,
        drain_timeout_s=1,
    )  # fmt: skip
    link = CoordinatorLink(url, registered.worker_id, registered.worker_secret)
    return Worker(link, backend, registered, settings, "fake")


async def test_a_take_by_a_worker_no_longer_registered_stops_the_worker(
    coordinator_url: str, admin_key: str, redis: Redis
) -> None:
    registered = await _register(coordinator_url, admin_key, "c")
    link = CoordinatorLink(coordinator_url, "c", registered.worker_secret)
    try:
        await redis.delete(keys.worker_key("c"))  # removed by hand; its secret is left behind
        with pytest.raises(WorkerGone):
            await link.take(0.01, ["fake"])
    finally:
        await link.close()

    registered = await _register(coordinator_url, admin_key, "d")
    worker = await _worker(coordinator_url, registered)
    await redis.delete(keys.worker_key("d"))
    stop = asyncio.Event()
    try:
        await asyncio.wait_for(worker.run(stop), timeout=20)  # it stops by itself instead of retrying for ever
    finally:
        await worker.link.close()
    assert stop.is_set()


@contextlib.asynccontextmanager
async def _serving(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """An HTTP server on a free local port answering every path with `handler`; yields its URL."""
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def not_the_coordinator() -> AsyncIterator[str]:
    """A proxy's error page, answered with status 200 to every call."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Welcome to our proxy</body></html>", content_type="text/html")

    async with _serving(page) as url:
        yield url


async def test_an_answer_that_is_not_the_coordinators_is_an_outage_to_retry(not_the_coordinator: str) -> None:
    link = CoordinatorLink(not_the_coordinator, "c", "secret")
    sender = link.heartbeat_sender(swarm_epoch=True)
    try:
        with pytest.raises(CoordinatorUnreachable):
            await link.take(0.01, ["fake"])
        with pytest.raises(CoordinatorUnreachable):
            await link.recover()
        with pytest.raises(CoordinatorUnreachable):
            await link.reclaim_orphans(set(), set())
        with pytest.raises(CoordinatorUnreachable):  # the heartbeat thread logs it and beats again
            await asyncio.to_thread(sender.send, Heartbeat(at=1.0), [])
    finally:
        await asyncio.to_thread(sender.close)  # the heartbeat thread's call, off this loop
        await link.close()


TAKE_REPLY_DELAY_S = 2.5  # a slow network: longer than two looks of a check tuned for Redis (1 s apart)


@pytest.fixture
async def slow_takes(coordinator_url: str) -> AsyncIterator[tuple[str, Counter[str]]]:
    """A proxy in front of the coordinator that delays every take's reply that carries a job, and
    counts those replies by request id."""
    taken: Counter[str] = Counter()
    http = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        async with http.request(
            request.method, coordinator_url + request.path_qs, data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")},
        ) as upstream:  # fmt: skip
            body = await upstream.read()
            status, content_type = upstream.status, upstream.content_type
        if request.path == "/worker/take" and status == 200:
            taken[Taken.model_validate_json(body).job.request_id] += 1
            await asyncio.sleep(TAKE_REPLY_DELAY_S)  # part of the scenario (a slow link), not a wait for state
        return web.Response(body=body, status=status, content_type=content_type)

    async with _serving(forward) as url:
        yield url, taken
    await http.close()


async def test_a_slow_take_reply_is_not_judged_an_orphan(
    coordinator_url: str, admin_key: str, slow_takes: tuple[str, Counter[str]]
) -> None:
    proxy_url, taken = slow_takes
    registered = await _register(coordinator_url, admin_key, "c")
    worker = await _worker(proxy_url, registered)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    async with httpx.AsyncClient(base_url=coordinator_url, headers={"Authorization": f"Bearer {admin_key}"}) as api:
        rid = (await api.post("/inference", json={"model": "fake", "prompt": "once"})).json()["request_id"]
        result = await api.get(f"/result/{rid}", params={"wait": 20}, timeout=30)
    stop.set()
    try:
        await asyncio.wait_for(running, timeout=20)
    finally:
        await worker.link.close()
    assert result.status_code == 200 and result.json()["status"] == "completed", result.text
    assert taken == {rid: 1}  # taken once: never queued again (and run twice) while its reply was on its way
