"""Clients made from a Sentinel URL, on a real deployment: a primary, a replica and three Sentinels.

The pool's private-attribute layer (`pipelined.py`) reads connections of the client's pool itself;
these tests hold it on the Sentinel pool too, through a coordinated failover that leaves the old
primary running as a replica.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError

from gputorrent import redis_client
from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.pipelined import pipelined
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, new_key, wait_for
from tests.sentinel import MASTER_NAME, SentinelDeployment


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    with SentinelDeployment(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


async def test_an_async_client_writes_on_the_primary_the_sentinels_name(deployment: SentinelDeployment) -> None:
    redis = redis_client.async_client(deployment.url, max_connections=4, pool_timeout=1)
    try:
        await redis.set("sentinel:probe", "1")
        assert (await redis.execute_command("ROLE"))[0] == "master"
        assert deployment.primary().ask("GET", "sentinel:probe") == "1"
    finally:
        await redis.aclose()


def test_a_sync_client_writes_on_the_primary_the_sentinels_name(deployment: SentinelDeployment) -> None:
    redis = redis_client.sync_client(deployment.url, decode_responses=True)
    try:
        redis.set("sentinel:sync-probe", "2")
        assert deployment.primary().ask("GET", "sentinel:sync-probe") == "2"
    finally:
        redis.close()


async def test_the_sentinel_pool_is_bounded_like_the_coordinators_blocking_pool(
    deployment: SentinelDeployment,
) -> None:
    redis = redis_client.async_client(deployment.url, max_connections=2, pool_timeout=0.2)
    pool = redis.connection_pool
    try:
        assert isinstance(pool, BlockingConnectionPool)
        held = [await pool.get_connection() for _ in range(2)]  # type: ignore[no-untyped-call]
        with pytest.raises(ConnectionError, match="No connection available"):
            await pool.get_connection()  # type: ignore[no-untyped-call]
        for connection in held:
            await pool.release(connection)
    finally:
        await redis.aclose()


async def test_the_private_parts_pipelined_reads_exist_on_sentinel_connections(
    deployment: SentinelDeployment,
) -> None:
    """If redis-py renames these, the pipelined layer breaks: fail here, loudly."""
    redis = redis_client.async_client(deployment.url)
    try:
        pool = redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        assert connection._reader is not None and connection._writer is not None
        assert (connection.host, connection.port) == ("127.0.0.1", deployment.primary_port())
        await pool.release(connection)
        assert pool.connection_kwargs["decode_responses"] is True
        shared = pipelined(redis)
        assert await shared.execute("SET", "sentinel:pipelined", "3") == "OK"
        assert await shared.execute("GET", "sentinel:pipelined") == "3"
    finally:
        await redis.aclose()


async def test_after_a_failover_the_shared_connection_and_the_pool_reach_the_new_primary(
    deployment: SentinelDeployment,
) -> None:
    """A coordinated failover leaves the old primary running as a replica, and Redis closes the
    connections to it: the command that finds it closed fails (a 503 for a request), the next one
    goes to the new primary."""
    redis = redis_client.async_client(deployment.url)
    try:
        shared = pipelined(redis)
        await shared.execute("SET", "sentinel:before", "1")
        old_port = deployment.primary_port()
        assert old_port is not None
        assert deployment.sentinels[0].ask("SENTINEL", "FAILOVER", MASTER_NAME) == "OK"
        deployment.wait_for_failover(old_port)
        wait_for(lambda: _role(deployment, old_port) == "slave", 30, "the old primary to turn replica")
        with pytest.raises(ConnectionError):
            await shared.execute("SET", "sentinel:after", "2")
        assert await shared.execute("SET", "sentinel:after", "2") == "OK"
        assert await shared.execute("GET", "sentinel:before") == "1"  # replicated before the switch
        assert await redis.set("sentinel:pooled", "3")
        assert deployment.primary().ask("GET", "sentinel:after") == "2"
    finally:
        await redis.aclose()


async def test_a_shared_connection_refused_writes_by_a_replica_is_dropped(deployment: SentinelDeployment) -> None:
    """A connection that reaches a replica where it expected the primary (made just as the roles
    changed) gets READONLY: it is dropped, so the next command asks the Sentinels again."""
    primary_port = deployment.primary_port()
    replica = next(s for s in deployment.servers if s.port != primary_port and s.running())
    redis = redis_client.async_client(f"redis://127.0.0.1:{replica.port}")
    try:
        shared = pipelined(redis)
        with pytest.raises(ConnectionError, match="no longer the primary"):
            await shared.execute("SET", "sentinel:on-replica", "1")
        assert shared._link is not None and shared._link.broken
        assert await shared.execute("GET", "sentinel:on-replica") is None  # a new connection; reads still work
    finally:
        await redis.aclose()


async def test_the_sentinels_confirm_the_primary_they_name_and_no_other_server(deployment: SentinelDeployment) -> None:
    """`still_primary` (what `GPUTORRENT_WAIT_REPLICAS=auto` asks when a primary's replicas fall): the
    server the Sentinels name is confirmed, a replica's run id is not; a plain URL has nobody to ask."""
    redis = redis_client.async_client(deployment.url)
    try:
        primary = deployment.primary()
        replica = next(s for s in deployment.servers if s is not primary and s.running())
        primary_id, replica_id = (str(server.client.info("server")["run_id"]) for server in (primary, replica))
        assert await redis_client.still_primary(redis, primary_id) is True
        assert await redis_client.still_primary(redis, replica_id) is False
    finally:
        await redis.aclose()
    plain = redis_client.async_client(f"redis://127.0.0.1:{replica.port}")
    try:
        assert await redis_client.still_primary(plain, replica_id) is True
    finally:
        await plain.aclose()


async def test_a_failover_is_heard_from_the_sentinels_once_with_the_new_primarys_address(
    deployment: SentinelDeployment,
) -> None:
    """`follow_failovers`, what every coordinator and worker runs: `SENTINEL FAILOVER` is announced by
    each Sentinel, and the callback runs once, with the promoted server's address."""
    redis = redis_client.async_client(deployment.url)
    stop = asyncio.Event()
    heard: list[str] = []
    switched = asyncio.Event()

    async def on_switch(address: str) -> None:
        heard.append(address)
        switched.set()

    following = asyncio.create_task(redis_client.follow_failovers(redis, on_switch, stop))
    try:
        # Settled first: a failover asked for while the last one's old primary still syncs as a replica
        # may promote that half-synced server, and the Sentinels then fail over once more.
        old = await asyncio.to_thread(deployment.wait_for_agreement, 60)
        # Subscribed once each Sentinel lists a client with a subscription (a Sentinel has no PUBSUB).
        for sentinel in deployment.sentinels:
            subscribed = lambda s=sentinel: " sub=1 " in str(s.ask("CLIENT", "LIST"))  # noqa: E731
            await asyncio.to_thread(wait_for, subscribed, 30, "the follower subscribed on every Sentinel")
        assert deployment.sentinels[1].ask("SENTINEL", "FAILOVER", MASTER_NAME) == "OK"
        await asyncio.wait_for(switched.wait(), 30)
        new = await asyncio.to_thread(deployment.wait_for_promotion, old)  # every Sentinel names it
        assert heard == [f"{new.address}:{new.port}"]
    finally:
        stop.set()
        await asyncio.wait_for(following, 10)
        await redis.aclose()


def _role(deployment: SentinelDeployment, port: int) -> str | None:
    server = next(s for s in deployment.servers if s.port == port)
    role = server.ask("ROLE")
    return str(role[0]) if isinstance(role, list) else None


def test_a_bad_sentinel_url_stops_each_command_with_one_line_naming_it() -> None:
    url = "redis+sentinel://:hunter2@s1:port/pool"
    for command in (["coordinator", "--redis-url", url], ["keys", "--redis-url", url, "list"]):
        done = subprocess.run(
            [sys.executable, "-m", "gputorrent", *command], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert "REDIS_URL" in done.stderr and "port of Sentinel address 's1:port'" in done.stderr
        assert "hunter2" not in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    procs: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        proc = Process(list(args), tmp_path / f"{args[0]}-{len(procs)}.log", env)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


def test_a_coordinator_a_worker_and_gputorrent_keys_serve_through_a_sentinel_url(
    deployment: SentinelDeployment, started: Callable[..., Process]
) -> None:
    url = deployment.url
    admin_key = new_key(url, "admin")  # `gputorrent keys create` through Sentinel
    port = free_port()
    beats = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "3"}
    coordinator = started("coordinator", "--port", str(port), "--redis-url", url, env=beats)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: coordinator.popen.poll() is not None or _healthy(base), PROCESS_START_TIMEOUT_S, "/health")
    assert coordinator.popen.poll() is None, coordinator.log
    join_key = new_key(url, "join")
    worker = started("worker", "--backend", "fake", "--coordinator", base, "--redis-url", url,
                     "--worker-id", "sentinel-w1", env={"GPUTORRENT_JOIN_TOKEN": join_key})  # fmt: skip
    headers = {"Authorization": f"Bearer {admin_key}"}
    wait_for(lambda: worker.popen.poll() is not None or "sentinel-w1" in _alive(base, headers),
             PROCESS_START_TIMEOUT_S, "the worker alive")  # fmt: skip
    assert worker.popen.poll() is None, worker.log
    with APIClient(base, api_key=admin_key) as client:
        result = client.infer("fake", "through sentinel", options={"max_tokens": 8})
    assert result.output == "echo: through sentinel"
    assert result.worker_id == "sentinel-w1"
    assert deployment.primary().ask("EXISTS", f"result:{result.request_id}") == 1


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _alive(base: str, headers: dict[str, str]) -> list[str]:
    try:
        workers = httpx.get(f"{base}/workers", headers=headers, timeout=2).json()
    except (httpx.TransportError, ValueError):
        return []
    return [w["worker_id"] for w in workers if w.get("state") == "alive"] if isinstance(workers, list) else []
