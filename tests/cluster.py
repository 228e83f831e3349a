"""A real Redis Cluster for tests: three primaries (each with `replicas` replicas) on free ports.

Every node is the machine's `redis-server` with `cluster-enabled yes`, in a temporary directory on
127.0.0.1; `redis-cli --cluster create` joins them and spreads the 16,384 slots over the primaries.
Start-up waits on what the nodes report (`cluster_state:ok` and every node known to every node,
each replica's link up), with timeouts; nothing waits a fixed time. The nodes declare a primary
failed after `NODE_TIMEOUT_MS`, so a failover takes a few seconds.

    with ClusterDeployment(tmp_path, replicas=1) as cluster:
        cluster.url                           # redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/
        owner = cluster.primary_of(slot)      # the node serving a slot
        cluster.migrate_slot(slot, to=other)  # the documented steps: IMPORTING, MIGRATING, MIGRATE, NODE
        source = cluster.begin_migration(slot, to=other)  # or in two steps
        cluster.finish_migration(slot, source, other)
        owner.kill(); cluster.wait_for_new_primary(slot, not_=owner)

A module whose tests run on a cluster overrides `redis_url` with the `cluster_url` fixture of
tests/conftest.py, so its tests and every fixture that reads `redis_url` (processes, the app in
process) use the cluster.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from gputorrent.embedded import free_port
from tests.conftest import wait_for
from tests.netns import Host
from tests.sentinel import HOST_DATA_PORT, Deployment, RedisProcess, redis_server_binary

START_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0
NODE_TIMEOUT_MS = 1000
PRIMARIES = 3
MIGRATE_BATCH = 100  # keys per MIGRATE
HOST_PORT = HOST_DATA_PORT  # a node's port on a host of its own (every host has its own ports)
ADMIN = ("admin", "admin-pw")  # the user a deployment with an ACL file is set up and watched as
ADMIN_ACL = f"user {ADMIN[0]} on >{ADMIN[1]} ~* &* +@all\n"


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if found is None:
        pytest.skip("Redis Cluster tests need redis-cli (Debian's redis-tools package) to create the cluster")
    return found


class ClusterDeployment(Deployment):
    """Three primaries, each with `replicas` replicas, as one Redis Cluster."""

    def __init__(
        self, workdir: Path, replicas: int = 0, users_acl: str | None = None, hosts: Sequence[Host] | None = None
    ) -> None:
        """`users_acl`: an ACL file every node loads; it must have the user `ADMIN` (every
        command), which the harness and `redis-cli --cluster create` use. `hosts`: one per node
        (tests/netns.py), each node then listening on its host's address, on `HOST_PORT`."""
        assert hosts is None or len(hosts) == PRIMARIES * (1 + replicas), "one host per node"
        self.workdir = workdir
        self.replicas = replicas
        self.users_acl = users_acl
        self.hosts = list(hosts) if hosts is not None else None
        self.binary = redis_server_binary()
        self.cli = redis_cli_binary()
        self.nodes: list[RedisProcess] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{node.address}:{node.port}" for node in self.nodes[:PRIMARIES]) + "/"

    def start(self) -> None:
        args = [
            "cluster-enabled yes", "cluster-config-file nodes.conf", f"cluster-node-timeout {NODE_TIMEOUT_MS}",
            'save ""', "appendonly no", "maxmemory-policy noeviction",
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0",
        ]  # fmt: skip
        login: dict[str, str] = {}
        if self.users_acl is not None:
            (self.workdir / "users.acl").parent.mkdir(parents=True, exist_ok=True)
            (self.workdir / "users.acl").write_text(self.users_acl)
            args.append(f"aclfile {self.workdir / 'users.acl'}")
            login = {"username": ADMIN[0], "password": ADMIN[1]}
        for i in range(PRIMARIES * (1 + self.replicas)):
            host = self.hosts[i] if self.hosts is not None else None
            # The bus port is the port plus 10,000 unless given: free ports here may be above 55,535.
            port, bus = (HOST_PORT, HOST_PORT + 10_000) if host is not None else (free_port(), free_port())
            node = RedisProcess(
                self.binary, self.workdir / f"node{i}", port, [*args, f"cluster-port {bus}"], host=host, **login
            )
            self.nodes.append(node)
        for node in self.nodes:
            up = f"node on {node.port} up"
            wait_for(lambda n=node: n.ask("PING") is True or not n.running(), START_TIMEOUT_S, up)
            assert node.running(), node.log
        cli_login = ["--user", ADMIN[0], "--pass", ADMIN[1]] if self.users_acl is not None else []
        subprocess.run(
            [self.cli, *cli_login, "--cluster", "create", *(f"{node.address}:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=START_TIMEOUT_S,
        )  # fmt: skip
        wait_for(self._formed, START_TIMEOUT_S, "every node in the cluster, state ok")

    def _formed(self) -> bool:
        for node in self.nodes:
            info = self.info(node)
            if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(len(self.nodes)):
                return False
            if node.ask("ROLE") is None:
                return False
        replicas_linked = sum(
            1 for node in self.nodes if (role := node.ask("ROLE")) and role[0] == "slave" and role[3] == "connected"
        )
        return replicas_linked == PRIMARIES * self.replicas

    @staticmethod
    def info(node: RedisProcess) -> dict[str, str]:
        text = node.ask("CLUSTER", "INFO")
        if not isinstance(text, str):
            return {}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def node_id(self, node: RedisProcess) -> str:
        return str(node.ask("CLUSTER", "MYID"))

    def primary_of(self, slot: int, among: list[RedisProcess] | None = None) -> RedisProcess | None:
        """The running node that serves `slot` as a primary, by its own word (None while none does)."""
        for node in among or self.nodes:
            if not node.running():
                continue
            role = node.ask("ROLE")
            if not role or role[0] != "master":
                continue
            for start, end, *_ in node.ask("CLUSTER", "SLOTS") or []:
                if int(start) <= slot <= int(end) and self._serves_itself(node, slot):
                    return node
        return None

    def _serves_itself(self, node: RedisProcess, slot: int) -> bool:
        for start, end, primary, *_ in node.ask("CLUSTER", "SLOTS") or []:
            if int(start) <= slot <= int(end):
                return (str(primary[0]) or node.address, int(primary[1])) == (node.address, node.port)
        return False

    def primaries(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.running() and (role := node.ask("ROLE")) and role[0] == "master"]

    def wait_for_new_primary(
        self, slot: int, not_: RedisProcess, among: list[RedisProcess] | None = None
    ) -> RedisProcess:
        """Wait until a running node other than `not_` (of `among`: those the caller can reach)
        serves `slot` and the cluster says ok."""

        def promoted() -> bool:
            owner = self.primary_of(slot, among)
            return owner is not None and owner is not not_ and self.info(owner).get("cluster_state") == "ok"

        wait_for(promoted, FAILOVER_TIMEOUT_S, f"a new primary for slot {slot}")
        owner = self.primary_of(slot, among)
        assert owner is not None
        return owner

    def migrate_slot(self, slot: int, to: RedisProcess) -> int:
        """Move `slot` with its keys to the primary `to`, by the steps Redis documents for resharding;
        returns how many keys moved. Commands for the slot's keys meanwhile get `ASK` or `TRYAGAIN`."""
        source = self.begin_migration(slot, to)
        return self.finish_migration(slot, source, to)

    def begin_migration(self, slot: int, to: RedisProcess) -> RedisProcess:
        """`to` imports `slot`, its primary migrates it (and is returned); no key has moved yet."""
        source = self.primary_of(slot)
        assert source is not None and source is not to
        assert to.ask("CLUSTER", "SETSLOT", str(slot), "IMPORTING", self.node_id(source)) == "OK"
        assert source.ask("CLUSTER", "SETSLOT", str(slot), "MIGRATING", self.node_id(to)) == "OK"
        return source

    def move_keys(self, slot: int, source: RedisProcess, target: RedisProcess, at_most: int | None = None) -> int:
        """Migrate the keys of `slot` from `source` to `target` (up to `at_most`); returns how many."""
        moved = 0
        while at_most is None or moved < at_most:
            batch_size = MIGRATE_BATCH if at_most is None else min(MIGRATE_BATCH, at_most - moved)
            batch = source.client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch_size)
            if not batch:
                break
            source.client.execute_command("MIGRATE", target.address, target.port, "", 0, 5000, "KEYS", *batch)
            moved += len(batch)
        return moved

    def finish_migration(self, slot: int, source: RedisProcess, target: RedisProcess) -> int:
        """Move the slot's remaining keys from `source` to `target`, then give every primary the slot's
        new owner; returns how many keys this moved."""
        moved = self.move_keys(slot, source, target)
        target_id = self.node_id(target)
        for node in (target, source, *(n for n in self.primaries() if n not in (target, source))):
            assert node.ask("CLUSTER", "SETSLOT", str(slot), "NODE", target_id) == "OK"
        wait_for(lambda: self.primary_of(slot) is target, START_TIMEOUT_S, f"slot {slot} served by {target.port}")
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
