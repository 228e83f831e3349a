"""The three-host layout of docs/operations.md, its redis.conf and sentinel.conf blocks as written, on
one loopback: three Redis servers loading the users.acl of docs/security.md, three Sentinels, and the
coordinators' and workers' REDIS_URL of the page. Only what cannot be the same on one machine is
changed: addresses and ports, the aclfile's path, the passwords (`with_test_passwords`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.retry import Retry

from gputorrent import redis_client
from gputorrent.embedded import free_port
from tests.conftest import documented_users_acl, wait_for, with_test_passwords
from tests.sentinel import START_TIMEOUT_S, RedisProcess, redis_server_binary

OPERATIONS_DOC = Path(__file__).parents[2] / "docs" / "operations.md"
HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
# A refused login is a ConnectionError to redis-py, retried with backoff by default: once is enough.
NO_RETRY = Retry(NoBackoff(), 0)
MASTER_NAME = "gputorrent"  # the page's


def _layout() -> tuple[str, str, str, str]:
    """The page's redis.conf and sentinel.conf blocks and the coordinators' and workers' REDIS_URL."""
    text = OPERATIONS_DOC.read_text()
    section = text[text.index("### Three hosts in production") :]
    section = section[: section.index("\n### ", 1)]
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", section, re.S)
    redis_conf = next(b for b in blocks if "port 6379" in b)
    sentinel_conf = next(b for b in blocks if "port 26379" in b)
    urls = re.findall(r"REDIS_URL='(redis\+sentinel://[^']+)'", section)
    coordinator_url = next(u for u in urls if u.startswith("redis+sentinel://coordinator:"))
    worker_url = next(u for u in urls if u.startswith("redis+sentinel://worker:"))
    return redis_conf, sentinel_conf, coordinator_url, worker_url


def _config_lines(block: str) -> list[str]:
    """The block's directives without `bind` and `port`, which RedisProcess sets for loopback."""
    return [line for line in with_test_passwords(block).splitlines() if not re.match(r"(bind|port) ", line)]


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[tuple[list[RedisProcess], list[RedisProcess], str, str]]:
    redis_conf, sentinel_conf, coordinator_url, worker_url = _layout()
    (tmp_path / "users.acl").write_text(documented_users_acl())
    binary = redis_server_binary()
    ports, sentinel_ports = [free_port() for _ in HOSTS], [free_port() for _ in HOSTS]
    servers: list[RedisProcess] = []
    sentinels: list[RedisProcess] = []
    try:
        for i, port in enumerate(ports):
            lines = [
                line.replace("/etc/redis/users.acl", str(tmp_path / "users.acl")).replace(
                    f"replicaof {HOSTS[0]} 6379", f"replicaof 127.0.0.1 {ports[0]}"
                )
                for line in _config_lines(redis_conf)
                if i > 0 or not line.startswith("replicaof ")  # h1 starts as the primary
            ]
            # Not the page's: the first full sync would wait Redis's default 5 s.
            lines.append("repl-diskless-sync-delay 0")
            servers.append(
                RedisProcess(
                    binary, tmp_path / f"h{i + 1}", port, lines, username="sentinel", password="sentinel-user-pw"
                )
            )
        for server in servers[1:]:
            wait_for(lambda s=server: _linked(s), START_TIMEOUT_S, f"replica on {server.port} following as `replica`")
        for i, port in enumerate(sentinel_ports):
            lines = [line.replace(f"{HOSTS[0]} 6379", f"127.0.0.1 {ports[0]}") for line in _config_lines(sentinel_conf)]
            workdir = tmp_path / f"h{i + 1}" / "sentinel"
            sentinels.append(RedisProcess(binary, workdir, port, lines, True, password="sentinel-pw"))
        for sentinel in sentinels:
            wait_for(lambda s=sentinel: _sentinel_ready(s), START_TIMEOUT_S, f"Sentinel on {sentinel.port} ready")
        on_loopback = ",".join(f"127.0.0.1:{port}" for port in sentinel_ports)
        given = ",".join(f"{host}:26379" for host in HOSTS)
        assert given in coordinator_url and given in worker_url, "the page's URLs name the three Sentinels"
        yield (
            servers,
            sentinels,
            with_test_passwords(coordinator_url).replace(given, on_loopback),
            with_test_passwords(worker_url).replace(given, on_loopback),
        )
    finally:
        for process in [*sentinels, *servers]:
            process.stop()


def _linked(server: RedisProcess) -> bool:
    info = server.ask("INFO", "replication")
    return isinstance(info, dict) and info.get("master_link_status") == "up"


def _sentinel_ready(sentinel: RedisProcess) -> bool:
    replicas = sentinel.ask("SENTINEL", "replicas", MASTER_NAME)
    others = sentinel.ask("SENTINEL", "sentinels", MASTER_NAME)
    return isinstance(replicas, list) and len(replicas) == 2 and isinstance(others, list) and len(others) == 2


def test_the_documented_layout_runs_and_each_url_reaches_the_primary_as_its_user(
    layout: tuple[list[RedisProcess], list[RedisProcess], str, str],
) -> None:
    servers, sentinels, coordinator_url, worker_url = layout
    assert all(s.running() for s in [*servers, *sentinels]), "a server refused the page's configuration"
    for server in servers:  # what the page's redis.conf says, on each server (asked as the Sentinels' user)
        memory, persistence = server.ask("INFO", "memory"), server.ask("INFO", "persistence")
        assert isinstance(memory, dict) and memory["maxmemory_policy"] == "noeviction"
        assert isinstance(persistence, dict) and persistence["aof_enabled"] == 1
        anonymous = SyncRedis(port=server.port, socket_timeout=2, retry=NO_RETRY)
        try:
            with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
                anonymous.ping()  # `default off` from the aclfile
        finally:
            anonymous.close()
    as_coordinator = redis_client.sync_client(coordinator_url, decode_responses=True)
    as_worker = redis_client.sync_client(worker_url, decode_responses=True)
    try:
        assert as_coordinator.execute_command("ACL", "WHOAMI") == "coordinator"
        assert as_coordinator.set("apikey:layout-probe", "1")
        assert as_worker.rpush("queue:layout-probe", "job") == 1
        with pytest.raises(NoPermissionError):
            as_worker.get("apikey:layout-probe")
    finally:
        as_coordinator.close()
        as_worker.close()
