"""The pool runs under the Redis ACL users docs/security.md shows: coordinators and workers each with
only the keys they need, on a server whose default user is off."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError

from gputorrent import keys, redis_client, registry
from gputorrent.client import APIClient
from gputorrent.embedded import free_port, server_binary
from gputorrent.protocol import Heartbeat
from tests.cluster import ADMIN_ACL, ClusterDeployment
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, documented_users_acl, healthy, new_key, wait_for


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[str]:
    """A private server with the documented ACL users; yields its host:port."""
    with _acl_server(tmp_path, documented_users_acl()) as address:
        yield address


@contextlib.contextmanager
def _acl_server(tmp_path: Path, users_acl: str) -> Iterator[str]:
    (tmp_path / "users.acl").write_text(users_acl)
    port = free_port()
    server = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--aclfile", str(tmp_path / "users.acl"), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    admin = redis.Redis(port=port, username="coordinator", password="coordinator-pw")
    try:
        wait_for(lambda: _pings(admin) or server.poll() is not None, 10, "the ACL server")
        assert server.poll() is None, "the server refused the ACL file"
        yield f"127.0.0.1:{port}"
    finally:
        admin.close()
        server.terminate()
        server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_pool_works_with_coordinator_and_worker_users_and_workers_cannot_read_keys(
    acl_redis: str, processes: Callable[..., Process]
) -> None:
    coordinator_url, worker_url = (f"redis://{user}:{user}-pw@{acl_redis}" for user in ("coordinator", "worker"))
    _pool_under_users(coordinator_url, worker_url, processes)


def cluster_users_acl(documented: str) -> str:
    """The documented users changed as docs/security.md says for a Redis Cluster: `{c*}` (every cell's
    hash tag) in front of each of the worker's key patterns and of its results channel (each cell's
    results are announced on a shard channel of the cell), and `+cluster|slots`, with which its client
    reads the slot map."""
    lines = []
    for line in documented.splitlines():
        if line.startswith("user worker "):
            line = line.replace("~", "~{c*}").replace("&results:ready", "&{c*}results:ready") + " +cluster|slots"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_on_a_redis_cluster_the_pool_works_with_the_users_changed_as_documented(
    tmp_path: Path, processes: Callable[..., Process]
) -> None:
    users = ADMIN_ACL + cluster_users_acl(documented_users_acl())
    with ClusterDeployment(tmp_path / "cluster", users_acl=users) as cluster:
        nodes = cluster.url.removeprefix("redis+cluster://")
        coordinator_url, worker_url = (f"redis+cluster://{who}:{who}-pw@{nodes}" for who in ("coordinator", "worker"))
        _pool_under_users(coordinator_url, worker_url, processes)


def _pool_under_users(coordinator_url: str, worker_url: str, processes: Callable[..., Process]) -> None:
    """A coordinator and a worker, each as its own user: jobs run and end early, and the worker user
    cannot read the API keys."""
    client_key = new_key(coordinator_url, "client")  # `gputorrent keys` as the coordinator user
    join_key = new_key(coordinator_url, "join")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timing = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "4"}
    coordinator = processes(
        "coordinator", "--port", str(port), name="coordinator", env={**timing, "REDIS_URL": coordinator_url}
    )
    wait_for(lambda: healthy(url) or coordinator.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "the coordinator")
    worker = processes(
        "worker", "--backend", "fake", "--coordinator", url, "--worker-id", "w1", name="worker",
        env={"REDIS_URL": worker_url, "GPUTORRENT_JOIN_TOKEN": join_key, "GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.01"},
    )  # fmt: skip
    with APIClient(url, api_key=client_key) as client:
        wait_for(lambda: worker.popen.poll() is not None or bool(client.workers()), PROCESS_START_TIMEOUT_S, "w1")
        assert client.infer("fake", "under acl", options={"max_tokens": 3}).output == "echo: under acl"
        accepted = client.submit("fake", " ".join(["word"] * 300), options={"max_tokens": 400})
        assert client.cancel(accepted.request_id).error is not None
        assert client.infer("fake", "still serving").output == "echo: still serving"

    as_worker = redis_client.sync_client(worker_url)
    try:
        with pytest.raises(NoPermissionError):
            as_worker.keys(keys.api_key_key("*"))
        with pytest.raises(NoPermissionError):
            as_worker.hgetall(keys.api_key_key(client_key.split("_")[1]))
    finally:
        as_worker.close()
    for proc in (worker, coordinator):
        proc.stop()
        # Every duty ran at least once (the worker's telemetry flush, the reaper): none was refused.
        assert "NOPERM" not in proc.log and "no permissions" not in proc.log.lower(), proc.log
        assert "The user executing the script can't" not in proc.log, proc.log  # refused within a script
        assert "Traceback" not in proc.log, proc.log


def test_a_worker_user_made_before_the_swarm_still_beats(tmp_path: Path) -> None:
    """A worker user without read access to `swarm:epoch` (an ACL written before the swarm): its beat
    still keeps it alive, and answers epoch 0, rather than failing and making the worker look dead."""
    documented = documented_users_acl()
    assert " %R~swarm:epoch " in documented
    with _acl_server(tmp_path, documented.replace(" %R~swarm:epoch ", " ")) as address:
        host, port = address.split(":")
        admin = redis.Redis(host=host, port=int(port), username="coordinator", password="coordinator-pw")
        worker = redis.Redis(host=host, port=int(port), username="worker", password="worker-pw")
        try:
            admin.set("swarm:epoch", 7)
            answer = registry.beat(worker, "w1", Heartbeat(at=1.0), ttl_s=10, swarm_epoch=True)
            assert (answer.drain, answer.swarm_epoch) == (False, 0)
            assert admin.exists("heartbeat:w1")
        finally:
            worker.close()
            admin.close()
