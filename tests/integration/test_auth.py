"""API keys, scoped results, join keys and worker secrets, and the admin routes, in process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gputorrent import auth, keys, up
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.app import create_app
from gputorrent.worker.main import Worker
from tests.conftest import eventually

MakeWorker = Callable[..., Awaitable[Worker]]
KeyedClient = Callable[[str | None], httpx.AsyncClient]


@contextlib.asynccontextmanager
async def _keyed_clients(settings: CoordinatorSettings) -> AsyncIterator[KeyedClient]:
    """Clients of one in-process coordinator, each sending the key it is given (or none)."""
    app = create_app(settings)
    clients: list[httpx.AsyncClient] = []

    def client(key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        made = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c", headers=headers)
        clients.append(made)
        return made

    async with app.router.lifespan_context(app):
        yield client
    for made in clients:
        await made.aclose()


@pytest.fixture
async def as_key(coordinator_settings: CoordinatorSettings) -> AsyncIterator[KeyedClient]:
    async with _keyed_clients(coordinator_settings) as client:
        yield client


async def _key(redis: Redis, scope: auth.Scope) -> str:
    return (await auth.create_key(redis, f"a {scope} key", scope))[1]


PROTECTED = [
    ("POST", "/inference", {"model": "fake", "prompt": "p"}),
    ("GET", "/result/r1", None),
    ("GET", "/stream/r1", None),
    ("DELETE", "/inference/r1", None),
    ("GET", "/workers", None),
    ("POST", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "p"}]}),
    ("GET", "/v1/models", None),
    ("POST", "/api/generate", {"model": "fake", "prompt": "p"}),
    ("GET", "/api/tags", None),
    ("POST", "/v1/messages", {"model": "fake", "max_tokens": 5, "messages": [{"role": "user", "content": "p"}]}),
    ("GET", "/admin/keys", None),
    ("POST", "/register", {"worker_id": "w9", "models": ["fake"], "backend": "fake"}),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
async def test_every_route_but_health_needs_a_live_key(
    as_key: KeyedClient, redis: Redis, method: str, path: str, body: object
) -> None:
    revoked = await _key(redis, "admin")
    parsed = auth.parse_key(revoked)
    assert parsed is not None
    await auth.revoke_key(redis, parsed[0])
    for key in (None, "gt_000000000000_" + "x" * 43, "not a key", revoked):
        response = await as_key(key).request(method, path, json=body)
        assert response.status_code == 401, (key, response.text)
        assert "API key" in response.text  # in each API family's own error shape
    assert (await as_key(None).get("/health")).status_code == 200


async def test_the_anthropic_header_x_api_key_is_accepted(as_key: KeyedClient, redis: Redis) -> None:
    key = await _key(redis, "client")
    response = await as_key(None).get("/v1/models", headers={"x-api-key": key})
    assert response.status_code == 200


async def test_a_key_reads_only_its_own_requests(
    as_key: KeyedClient, redis: Redis, fake_worker: MakeWorker, admin_key: str
) -> None:
    worker = await fake_worker("w1")
    alice, bob = as_key(await _key(redis, "client")), as_key(await _key(redis, "client"))
    request_id = (await alice.post("/inference", json={"model": "fake", "prompt": "mine"})).json()["request_id"]
    await worker.run(asyncio.Event(), burst=True)

    assert (await alice.get(f"/result/{request_id}")).json()["output"] == "echo: mine"
    for response in (
        await bob.get(f"/result/{request_id}"),
        await bob.get(f"/stream/{request_id}"),
        await bob.delete(f"/inference/{request_id}"),
    ):
        assert response.status_code == 404  # as if it did not exist: an id alone proves nothing
        assert response.json()["error"]["code"] == "request_not_found"
    assert (await as_key(admin_key).get(f"/result/{request_id}")).status_code == 200


async def test_idempotency_keys_are_per_api_key_and_request_ids_are_not_shared(
    as_key: KeyedClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")
    alice, bob = as_key(await _key(redis, "client")), as_key(await _key(redis, "client"))
    body = {"model": "fake", "prompt": "p"}
    first = await alice.post("/inference", json=body, headers={"Idempotency-Key": "k"})
    other = await bob.post("/inference", json=body, headers={"Idempotency-Key": "k"})
    assert first.json()["request_id"] != other.json()["request_id"]
    assert not other.json()["replayed"]

    await alice.post("/inference", json=body | {"request_id": "shared-id-0001"})
    taken = await bob.post("/inference", json=body | {"request_id": "shared-id-0001"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "conflict"


async def test_scopes_limit_what_a_key_may_do(as_key: KeyedClient, redis: Redis, fake_worker: MakeWorker) -> None:
    await fake_worker("w1")
    join, client = as_key(await _key(redis, "join")), as_key(await _key(redis, "client"))
    submitted = await join.post("/inference", json={"model": "fake", "prompt": "p"})
    assert submitted.status_code == 403 and submitted.json()["error"]["code"] == "forbidden"
    registered = await client.post("/register", json={"worker_id": "w2", "models": ["fake"], "backend": "fake"})
    assert registered.status_code == 403
    assert (await client.get("/admin/keys")).status_code == 403
    assert (await client.post("/admin/workers/w1/revoke")).status_code == 403
    assert (await join.post("/admin/workers/w1/revoke")).status_code == 403


async def test_a_live_workers_id_cannot_be_taken_without_its_secret(as_key: KeyedClient, redis: Redis) -> None:
    join = as_key(await _key(redis, "join"))
    body = {"worker_id": "w1", "models": ["fake"], "backend": "fake"}
    first = await join.post("/register", json=body)
    assert first.status_code == 200
    secret = first.json()["worker_secret"]
    assert len(secret) >= 40 and await redis.get(keys.worker_secret_key("w1")) == auth.hash_secret(secret)

    hijack = await join.post("/register", json=body)
    assert hijack.status_code == 409
    wrong = await join.post("/register", json=body | {"worker_secret": "guess"})
    assert wrong.status_code == 409
    again = await join.post("/register", json=body | {"worker_secret": secret})
    assert again.status_code == 200 and again.json()["worker_secret"] != secret

    workers = await as_key(await _key(redis, "client")).get("/workers")
    assert "worker_secret" not in workers.text and secret not in workers.text


async def test_admin_routes_manage_keys_and_workers(
    as_key: KeyedClient, redis: Redis, fake_worker: MakeWorker, admin_key: str
) -> None:
    admin = as_key(admin_key)
    created = await admin.post("/admin/keys", json={"name": "ci", "scope": "client"})
    assert created.status_code == 201
    new_key, key_id = created.json()["key"], created.json()["info"]["key_id"]
    assert (await as_key(new_key).get("/v1/models")).status_code == 200
    listed = (await admin.get("/admin/keys")).json()
    assert key_id in [k["key_id"] for k in listed] and new_key not in str(listed)
    assert (await admin.delete(f"/admin/keys/{key_id}")).status_code == 204
    assert (await as_key(new_key).get("/v1/models")).status_code == 401
    assert (await admin.delete(f"/admin/keys/{key_id}")).status_code == 404

    worker = await fake_worker("w1")
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    assert (await admin.delete("/admin/workers/w1")).status_code == 409  # alive: drain it first
    assert (await admin.post("/admin/workers/w1/drain")).status_code == 202
    await asyncio.wait_for(running, timeout=10)  # it heard the drain at its next heartbeat and left
    assert stop.is_set()
    assert (await admin.get("/workers")).json() == []
    assert (await admin.post("/admin/workers/w1/drain")).status_code == 404


@pytest.fixture
async def limited(coordinator_settings: CoordinatorSettings) -> AsyncIterator[KeyedClient]:
    """A coordinator with small per-key limits."""
    settings = coordinator_settings.model_copy(
        update={"rate_limit_rpm": 3, "rate_limit_tpm": 0, "max_streams": 1, "max_prompt_chars": 50, "max_tokens": 300}
    )
    async with _keyed_clients(settings) as client:
        yield client


async def test_requests_past_the_minutes_limit_get_429_with_retry_after(
    limited: KeyedClient, redis: Redis, fake_worker: MakeWorker, admin_key: str
) -> None:
    await fake_worker("w1")
    alice, bob = limited(await _key(redis, "client")), limited(await _key(redis, "client"))
    body = {"model": "fake", "prompt": "p"}
    assert [(await alice.post("/inference", json=body)).status_code for _ in range(3)] == [202, 202, 202]
    refused = await alice.post("/inference", json=body)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    openai = await alice.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "p"}]}
    )
    assert openai.status_code == 429 and openai.json()["error"]["type"]  # OpenAI's shape
    assert (await bob.post("/inference", json=body)).status_code == 202  # the limit is per key
    assert (await limited(admin_key).post("/inference", json=body)).status_code == 202  # admins are not limited


async def test_oversized_prompts_and_max_tokens_are_refused_naming_the_field(
    limited: KeyedClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")
    client = limited(await _key(redis, "client"))
    long_prompt = await client.post("/inference", json={"model": "fake", "prompt": "x" * 51})
    assert long_prompt.status_code == 422
    assert long_prompt.json()["error"]["fields"][0]["field"] == "prompt"
    too_many = await client.post("/inference", json={"model": "fake", "prompt": "p", "options": {"max_tokens": 301}})
    assert too_many.json()["error"]["fields"][0]["field"] == "options.max_tokens"
    openai = await client.post("/v1/completions", json={"model": "fake", "prompt": "x" * 51})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "prompt"


async def test_a_key_may_hold_only_so_many_streams_open(
    limited: KeyedClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")
    key = await _key(redis, "client")
    parsed = auth.parse_key(key)
    assert parsed is not None
    await redis.zadd(keys.open_streams_key(parsed[0]), {"an-open-stream": time.time()})
    refused = await limited(key).post("/inference", json={"model": "fake", "prompt": "p", "stream": True})
    assert refused.status_code == 429 and "streams open" in refused.json()["error"]["message"]
    await redis.zrem(keys.open_streams_key(parsed[0]), "an-open-stream")  # that stream closed
    worker = await fake_worker("w1")
    streamed = asyncio.create_task(
        limited(key).post("/inference", json={"model": "fake", "prompt": "p", "stream": True})
    )
    await eventually(lambda: _queued(redis), "the streamed request to be queued")
    await worker.run(asyncio.Event(), burst=True)
    assert (await streamed).status_code == 200
    assert await redis.zcard(keys.open_streams_key(parsed[0])) == 0  # its slot was given back


async def _queued(redis: Redis) -> bool:
    return bool(await redis.llen(keys.queue_key("w1")))


def test_up_makes_its_admin_key_once_and_brings_it_back_into_a_fresh_redis(redis_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "home" / "api-key"
    key, first = up._admin_key(redis_url, key_file)
    again, second = up._admin_key(redis_url, key_file)
    assert (first, second) == (True, False) and key == again
    assert key_file.stat().st_mode & 0o777 == 0o600
    with SyncRedis.from_url(redis_url) as fresh:
        fresh.flushdb()  # as a private Redis starts empty on the next run
    assert up._admin_key(redis_url, key_file) == (key, False)
    verified = asyncio.run(up._with_redis(redis_url, lambda redis: auth.verify(redis, key)))
    assert verified is not None and verified.scope == "admin"


async def test_a_request_id_another_key_was_given_cannot_be_taken(
    as_key: KeyedClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    await fake_worker("w1")
    alice, bob = as_key(await _key(redis, "client")), as_key(await _key(redis, "client"))
    theirs = (await alice.post("/inference", json={"model": "fake", "prompt": "p"})).json()["request_id"]
    taken = await bob.post("/inference", json={"model": "fake", "prompt": "p", "request_id": theirs})
    assert taken.status_code == 409
    assert (await alice.get(f"/result/{theirs}")).status_code == 202  # still alice's, untouched


async def test_a_key_revoked_elsewhere_stops_working_here_though_this_coordinator_cached_it(
    coordinator_settings: CoordinatorSettings, redis: Redis
) -> None:
    key = await _key(redis, "client")
    parsed = auth.parse_key(key)
    assert parsed is not None
    app = create_app(coordinator_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://c", headers={"Authorization": f"Bearer {key}"}
        ) as client,
    ):

        async def kept() -> bool:  # the listener subscribes as the app starts: until then nothing is kept
            answered = (await client.get("/v1/models")).status_code == 200
            return answered and app.state.key_cache.get(parsed[0], auth.hash_secret(parsed[1])) is not None

        await eventually(kept, "the key to be kept in the key cache", timeout_s=2)
        await redis.delete(keys.api_key_key(parsed[0]))  # by hand, unannounced: the kept key still answers
        assert (await client.get("/v1/models")).status_code == 200
        await auth.revoke_key(redis, parsed[0])  # as `gputorrent keys revoke` or another coordinator does

        async def refused() -> bool:
            return (await client.get("/v1/models")).status_code == 401

        await eventually(refused, "the revocation to reach the coordinator", timeout_s=2)
