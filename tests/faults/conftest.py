"""Fixtures of the fault suite: a fresh private Redis and process pool per scenario, and the report."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gputorrent.embedded import EmbeddedRedis
from tests.faults.harness import Pool, Row, write_report_row
from tests.faults.netns_pool import HostPool
from tests.netns import Host

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


@pytest.fixture
def record() -> Callable[[Row], None]:
    """Write a scenario's row to `$GPUTORRENT_FAULT_REPORT` (when set); call it before asserting."""
    return write_report_row
