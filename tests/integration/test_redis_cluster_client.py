"""The client of a `redis+cluster://` URL on a real three-primary Redis Cluster (tests/cluster.py):
it reaches the primary of the pool's cell, follows the cell when its slot moves, and holds a command
while the slot's keys migrate; and the redis-py private parts it and `pipelined.py` build on are there."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio.connection as async_connection
import redis.connection as sync_connection
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError

from gputorrent import keys, pipelined, redis_client
from tests.cluster import ClusterDeployment

CELL = key_slot(keys.CLUSTER_CELL_TAG.encode())


@pytest.fixture
async def cell_client(cluster: ClusterDeployment) -> AsyncIterator[Redis]:
    """A client of the cluster, empty before each test."""
    for node in cluster.primaries():
        node.client.flushall()
    client = redis_client.async_client(cluster.url)
    yield client
    await client.aclose()


def test_the_redis_py_private_parts_the_project_uses_are_there() -> None:
    """redis_client.py opens a cell's connections by setting `host` and `port` before `_connect`;
    pipelined.py writes and reads a pool's connection through `_writer` and `_reader`. A redis-py
    that changes them fails here, not silently in production (pyproject.toml bounds its version)."""
    for cls in (async_connection.Connection, async_connection.SSLConnection):
        assert inspect.iscoroutinefunction(cls._connect), cls
        assert {"host", "port"} <= set(inspect.signature(cls.__init__).parameters) | set(
            inspect.signature(async_connection.Connection.__init__).parameters
        )
    for sync_cls in (sync_connection.Connection, sync_connection.SSLConnection):
        assert callable(sync_cls._connect) and not inspect.iscoroutinefunction(sync_cls._connect), sync_cls
    connection = async_connection.Connection()
    assert connection._reader is None and connection._writer is None


async def test_a_cluster_client_names_keys_in_the_cell_and_reaches_its_primary(
    cluster: ClusterDeployment, cell_client: Redis
) -> None:
    assert keys.queue_key("w1") == "{c0}queue:w1"  # the client named the keys for the cluster
    await cell_client.rpush(keys.queue_key("w1"), "r1")
    assert await pipelined.pipelined(cell_client).execute("LLEN", keys.queue_key("w1")) == 1
    owner = cluster.primary_of(CELL)
    assert owner is not None and owner.client.lrange("{c0}queue:w1", 0, -1) == ["r1"]
    sync = redis_client.sync_client(cluster.url, decode_responses=True)
    try:
        assert sync.lrange(keys.queue_key("w1"), 0, -1) == ["r1"]
    finally:
        sync.close()


async def test_the_client_follows_the_cell_when_its_slot_moves_and_holds_commands_while_it_migrates(
    cluster: ClusterDeployment, cell_client: Redis
) -> None:
    shared = pipelined.pipelined(cell_client)
    await shared.execute("SET", keys.job_key("before"), "1")
    new = next(node for node in cluster.primaries() if node is not cluster.primary_of(CELL))
    old = cluster.begin_migration(CELL, to=new)  # half a move: no key has moved yet
    # A key the old primary lacks is ASKed of the new one: the command waits, and runs on neither.
    writing = asyncio.create_task(shared.execute("SET", keys.job_key("during"), "2"))
    done, _ = await asyncio.wait({writing}, timeout=0.5)
    assert not done, "a command for a key of a migrating slot ran before the slot was served"
    counts = [node.ask("CLUSTER", "COUNTKEYSINSLOT", str(CELL)) for node in (old, new)]
    assert counts == [1, 0], counts  # only the key written before
    assert cluster.finish_migration(CELL, old, new) == 1
    assert await asyncio.wait_for(writing, timeout=pipelined.REDIRECT_WAIT_S) == "OK"
    assert new.client.get("{c0}job:during") == "2" and old.client.dbsize() == 0
    # The old primary answers MOVED now: each client asks the cluster anew, pipelined and redis-py's own.
    assert await shared.execute("GET", keys.job_key("before")) == "1"
    assert await cell_client.get(keys.job_key("during")) == "2"


def test_a_blocking_clients_pipeline_that_reads_moved_without_raising_goes_to_the_new_primary_next(
    cluster: ClusterDeployment, cell_client: Redis
) -> None:
    """A worker's beat is such a pipeline (`raise_on_error=False`): redis-py neither retries it nor
    drops its connection, so without the cell's own check every later beat would reach the old node."""
    sync = redis_client.sync_client(cluster.url, decode_responses=True)
    try:
        assert sync.set(keys.heartbeat_key("w1"), "1")
        owner = cluster.primary_of(CELL)
        cluster.migrate_slot(CELL, to=next(node for node in cluster.primaries() if node is not owner))
        with sync.pipeline(transaction=False) as pipe:
            pipe.set(keys.heartbeat_key("w1"), "2")
            (refused,) = pipe.execute(raise_on_error=False)
        assert isinstance(refused, MovedError)
        with sync.pipeline(transaction=False) as pipe:
            pipe.set(keys.heartbeat_key("w1"), "3")
            assert pipe.execute(raise_on_error=False) == [True]
        assert sync.get(keys.heartbeat_key("w1")) == "3"
    finally:
        sync.close()


async def test_a_send_the_node_ran_only_part_of_is_a_connection_error_not_sent_again(
    cluster: ClusterDeployment, cell_client: Redis
) -> None:
    """Mid-migration the old primary runs a command on a key it still has and refuses one on a key it
    lacks: sending both again would run the first twice, so the caller gets a lost connection's error."""
    shared = pipelined.pipelined(cell_client)
    await shared.execute("SET", keys.job_key("here"), "0")
    new = next(node for node in cluster.primaries() if node is not cluster.primary_of(CELL))
    old = cluster.begin_migration(CELL, to=new)
    try:
        with pytest.raises(RedisConnectionError, match="ran only some of the commands"):
            await shared.execute_all(("INCR", keys.job_key("here")), ("INCR", keys.job_key("elsewhere")))
        assert old.client.get("{c0}job:here") == "1"  # the first ran, once
    finally:
        cluster.finish_migration(CELL, old, new)
    assert await shared.execute("GET", keys.job_key("here")) == "1"
    assert await shared.execute("EXISTS", keys.job_key("elsewhere")) == 0


async def test_a_cluster_none_of_whose_nodes_answers_is_a_connection_error_naming_the_slot(tmp_path: Path) -> None:
    with ClusterDeployment(tmp_path / "cluster") as cluster:
        url = cluster.url
    client = redis_client.async_client(url, socket_connect_timeout=0.5)
    try:
        with pytest.raises(RedisConnectionError, match=f"primary of slot {CELL}"):
            await client.get(keys.workers(0))
    finally:
        await client.aclose()
