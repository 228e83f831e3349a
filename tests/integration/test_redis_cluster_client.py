"""The client of a `redis+cluster://` URL on a real three-primary Redis Cluster (tests/cluster.py):
redis-py's `RedisCluster`, and `pipelined.py`'s connection per slot beside it. Each reaches the
primary serving a key's slot, follows the slot when it moves, and holds a script while the slot's
keys migrate; and the redis-py private parts `pipelined.py` builds on are there."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio.connection as async_connection
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from gputorrent import keys, pipelined, redis_client
from gputorrent.redis_client import REDIS_FAILURES
from tests.cluster import ClusterDeployment

CELL = key_slot(keys.CLUSTER_CELL_TAG.encode())


@pytest.fixture(autouse=True)
def _one_cell() -> Iterator[None]:
    """The client's tests name keys of one cell, `{c0}` (the cells are test_cells_on_redis_cluster.py's)."""
    keys.use_cluster_cells(1)
    yield
    keys.use_cluster_cells()


@pytest.fixture
async def cell_client(cluster: ClusterDeployment) -> AsyncIterator[RedisCluster]:
    """A client of the cluster, empty before each test."""
    for node in cluster.primaries():
        node.client.flushall()
    client = redis_client.async_client(cluster.url)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


def test_the_redis_py_private_parts_the_project_uses_are_there() -> None:
    """pipelined.py takes a connection for a slot from the cluster client's node (`nodes_manager`,
    `get_node_from_slot`, `acquire_connection`, `release`), reads the slot map again after a `MOVED`
    (`initialize`), and writes and reads a connection through `_writer` and `_reader`. A redis-py that
    changes them fails here, not silently in production (pyproject.toml bounds its version)."""
    assert callable(RedisCluster.get_connection_kwargs)
    assert inspect.iscoroutinefunction(NodesManager.initialize)
    assert callable(NodesManager.get_node_from_slot)
    assert callable(ClusterNode.acquire_connection) and not inspect.iscoroutinefunction(ClusterNode.acquire_connection)
    assert callable(ClusterNode.release) and not inspect.iscoroutinefunction(ClusterNode.release)
    connection = async_connection.Connection()
    assert connection._reader is None and connection._writer is None


async def test_a_cluster_client_names_keys_in_the_cell_and_reaches_its_primary(
    cluster: ClusterDeployment, cell_client: RedisCluster
) -> None:
    assert keys.queue_key("w1") == "{c0}queue:w1"  # the client named the keys for the cluster
    await cell_client.rpush(keys.queue_key("w1"), "r1")
    assert await pipelined.pipelined(cell_client, keys.queue_key("w1")).execute("LLEN", keys.queue_key("w1")) == 1
    owner = cluster.primary_of(CELL)
    assert owner is not None and owner.client.lrange("{c0}queue:w1", 0, -1) == ["r1"]
    sync = redis_client.sync_client(cluster.url, decode_responses=True)
    try:
        assert sync.lrange(keys.queue_key("w1"), 0, -1) == ["r1"]
    finally:
        sync.close()


async def test_a_call_on_a_cluster_must_name_a_key_of_its_slot(cell_client: RedisCluster) -> None:
    with pytest.raises(ValueError, match="names a key of its slot"):
        pipelined.pipelined(cell_client)


async def test_each_slot_has_its_own_connection_to_the_primary_serving_it(
    cluster: ClusterDeployment, cell_client: RedisCluster
) -> None:
    """Keys of slots on three primaries, each read through its slot's shared connection."""
    by_primary: dict[int, str] = {}
    for i in range(1000):
        name = f"{{k{i}}}x"
        owner = cluster.primary_of(key_slot(name.encode()))
        assert owner is not None
        by_primary.setdefault(owner.port, name)
        if len(by_primary) == 3:
            break
    assert len(by_primary) == 3
    for port, name in by_primary.items():
        await pipelined.pipelined(cell_client, name).execute("SET", name, str(port))
    for node in cluster.primaries():
        assert node.client.get(by_primary[node.port]) == str(node.port)
    assert len({id(pipelined.pipelined(cell_client, name)) for name in by_primary.values()}) == 3


async def test_the_client_follows_the_cell_when_its_slot_moves_and_holds_scripts_while_it_migrates(
    cluster: ClusterDeployment, cell_client: RedisCluster
) -> None:
    shared = pipelined.pipelined(cell_client, keys.job_key("before"))
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


def test_a_blocking_clients_pipeline_goes_to_the_new_primary_after_its_slot_moved(
    cluster: ClusterDeployment, cell_client: RedisCluster
) -> None:
    """A worker's beat is such a pipeline, read without raising (`raise_on_error=False`)."""
    sync = redis_client.sync_client(cluster.url, decode_responses=True)
    try:
        assert sync.set(keys.heartbeat_key("w1"), "1")
        owner = cluster.primary_of(CELL)
        new = next(node for node in cluster.primaries() if node is not owner)
        cluster.migrate_slot(CELL, to=new)
        with sync.pipeline(transaction=False) as pipe:
            pipe.set(keys.heartbeat_key("w1"), "2")
            assert pipe.execute(raise_on_error=False) == [True]
        assert new.client.get("{c0}heartbeat:w1") == "2"
    finally:
        sync.close()


async def test_a_send_the_node_ran_only_part_of_is_a_connection_error_not_sent_again(
    cluster: ClusterDeployment, cell_client: RedisCluster
) -> None:
    """Mid-migration the old primary runs a command on a key it still has and refuses one on a key it
    lacks: sending both again would run the first twice, so the caller gets a lost connection's error."""
    shared = pipelined.pipelined(cell_client, keys.job_key("here"))
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


async def test_a_cluster_none_of_whose_nodes_answers_fails_as_redis_being_away(tmp_path: Path) -> None:
    """redis-py's cluster client raises errors that are not `RedisError`s there: `REDIS_FAILURES`
    names them, so every caller that answers 503 or tries again treats them so."""
    with ClusterDeployment(tmp_path / "cluster") as cluster:
        url = cluster.url
    client = redis_client.async_client(url, socket_connect_timeout=0.5)
    try:
        with pytest.raises(REDIS_FAILURES):
            await client.get(keys.workers(0))
        with pytest.raises(REDIS_FAILURES):
            await pipelined.pipelined(client, keys.workers(0)).execute("GET", keys.workers(0))
    finally:
        await client.aclose()
