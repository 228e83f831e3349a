"""Fixtures of the fault suite: a fresh private Redis and process pool per scenario, and the report."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gputorrent.embedded import EmbeddedRedis
from tests.cluster import ClusterDeployment
from tests.faults.harness import Pool, Row, write_report_row
from tests.faults.netns_pool import HostPool
from tests.netns import Host
from tests.sentinel import SentinelDeployment

PoolFactory = Callable[..., Pool]


@pytest.fixture
def pool_factory(tmp_path: Path) -> Iterator[PoolFactory]:
    """Make the scenario's pool: `pool_factory(appendonly=True, max_attempts=2)`.

    Each scenario gets its own Redis server (not a flushed shared one) because some restart it.
    """
    made: list[tuple[Pool, EmbeddedRedis]] = []

    def make(*, appendonly: bool = False, max_attempts: int = 3) -> Pool:
        server = EmbeddedRedis(appendonly=appendonly).start()
        pool = Pool(tmp_path, server, max_attempts=max_attempts)
        made.append((pool, server))
        return pool

    yield make
    for pool, server in reversed(made):
        pool.close()
        server.stop()


@pytest.fixture
def pool(pool_factory: PoolFactory) -> Pool:
    """A pool with one coordinator (`c1`) and no workers yet."""
    made = pool_factory()
    made.coordinator("c1")
    return made


@pytest.fixture
def host_pool(netns_hosts: Callable[..., dict[str, Host]], tmp_path: Path) -> Iterator[Callable[..., HostPool]]:
    """A pool on separate hosts (tests/faults/netns_pool.py): `host_pool("c1", "w1", "w2", "client")`
    makes a `redis` host and these, starts Redis and the coordinators (the `c*` hosts); workers are
    started by the test. Skips where network namespaces cannot be made."""
    made: list[HostPool] = []

    def make(*names: str, max_attempts: int = 3) -> HostPool:
        pool = HostPool(tmp_path, netns_hosts("redis", *names), max_attempts=max_attempts)
        made.append(pool)
        for name in names:
            if re.fullmatch(r"c\d+", name):
                pool.coordinator(name)
        return pool

    yield make
    for pool in reversed(made):
        pool.close()


# The Sentinel layout on hosts of docs/operations.md's three hosts: a data server and a Sentinel on
# each of `r1` (the primary at first), `r2` and `r3` (its replicas).
SENTINEL_HOSTS = ("r1", "r2", "r3")
# As docs/operations.md advises with two replicas: a primary that no replica has acknowledged for
# this long refuses writes (NOREPLICAS), so one cut off from the others stops taking jobs and results.
# 5 s there, with down-after-milliseconds 5000; 2 s here (replicas acknowledge every second).
MIN_REPLICAS_MAX_LAG_S = 2


@pytest.fixture
def sentinel_host_pool(
    netns_hosts: Callable[..., dict[str, Host]], tmp_path: Path
) -> Iterator[Callable[..., tuple[HostPool, SentinelDeployment]]]:
    """A pool on separate hosts whose Redis is a primary, two replicas and three Sentinels on hosts
    of their own (`SENTINEL_HOSTS`): `pool, deployment = sentinel_host_pool("c1", "w1", "w2", "client")`
    starts them and the coordinators (the `c*` hosts), all given the Sentinel URL with the hosts'
    addresses; workers are started by the test. Skips where network namespaces cannot be made."""
    made: list[HostPool] = []

    def make(*names: str, max_attempts: int = 3) -> tuple[HostPool, SentinelDeployment]:
        hosts = netns_hosts(*SENTINEL_HOSTS, *names)
        placed = [hosts[name] for name in SENTINEL_HOSTS]
        deployment = SentinelDeployment(
            tmp_path / "redis", replicas=2, hosts=placed, sentinel_hosts=placed,
            server_args=["min-replicas-to-write 1", f"min-replicas-max-lag {MIN_REPLICAS_MAX_LAG_S}"],
        )  # fmt: skip
        with contextlib.ExitStack() as unwind:
            unwind.callback(deployment.stop)
            deployment.start()
            pool = HostPool(tmp_path, hosts, max_attempts=max_attempts, redis=deployment)
            unwind.pop_all()
        made.append(pool)  # its close() stops the deployment
        for name in names:
            if re.fullmatch(r"c\d+", name):
                pool.coordinator(name)
        return pool, deployment

    yield make
    for pool in reversed(made):
        pool.close()


# A Redis Cluster on hosts of its own: three primaries and a replica of each, one node a host.
CLUSTER_HOSTS = ("r1", "r2", "r3", "r4", "r5", "r6")


@pytest.fixture
def cluster_host_pool(
    netns_hosts: Callable[..., dict[str, Host]], tmp_path: Path
) -> Iterator[Callable[..., tuple[HostPool, ClusterDeployment]]]:
    """A pool on separate hosts whose Redis is a three-primary cluster with a replica each, one node
    on each of `CLUSTER_HOSTS`: `pool, cluster = cluster_host_pool("c1", "w1", "w2", "client")` starts
    it and the coordinators (the `c*` hosts), all given the `redis+cluster://` URL with the
    primaries' addresses; workers are started by the test. Skips where namespaces cannot be made."""
    made: list[HostPool] = []

    def make(*names: str) -> tuple[HostPool, ClusterDeployment]:
        hosts = netns_hosts(*CLUSTER_HOSTS, *names)
        cluster = ClusterDeployment(tmp_path / "cluster", replicas=1, hosts=[hosts[name] for name in CLUSTER_HOSTS])
        with contextlib.ExitStack() as unwind:
            unwind.callback(cluster.stop)
            cluster.start()
            pool = HostPool(tmp_path, hosts, redis=cluster)
            unwind.pop_all()
        made.append(pool)  # its close() stops the cluster
        for name in names:
            if re.fullmatch(r"c\d+", name):
                pool.coordinator(name)
        return pool, cluster

    yield make
    for pool in reversed(made):
        pool.close()


@pytest.fixture
def record() -> Callable[[Row], None]:
    """Write a scenario's row to `$GPUTORRENT_FAULT_REPORT` (when set); call it before asserting."""
    return write_report_row
