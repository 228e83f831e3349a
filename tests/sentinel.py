"""A real Redis Sentinel deployment for tests: one primary, replicas and three Sentinels on free ports.

Every process is the machine's `redis-server` (Sentinels are `redis-server CONF --sentinel`), in a
temporary directory, on 127.0.0.1. Start-up waits on what the servers report (each replica's link
up in `INFO replication`, each Sentinel naming the primary and knowing the replicas and the other
Sentinels), with timeouts; nothing waits a fixed time. Sentinels run with short failure detection
(`down-after-milliseconds`, `failover-timeout`) so a failover takes seconds.

    with SentinelDeployment(tmp_path) as deployment:
        deployment.url                  # redis+sentinel://127.0.0.1:P1,.../pool
        at = deployment.kill_primary()  # kill -9
        deployment.wait_for_failover()  # a replica promoted and named by every Sentinel

On separate hosts (tests/netns.py) give `hosts` (one per data server, the first the primary) and
`sentinel_hosts` (three): each server then listens on its host's address, data servers on 6379 and
Sentinels on 26379 (every host has its own ports), and is started there; the test process, on the
bridge, asks them as an observer. A host's link cut hides its servers: `wait_for_promotion` and
`primary_endpoint` then ask only the Sentinels they are given (those on the majority side).

With `users=ServerUsers(...)` every data server loads the same ACL file (Redis does not replicate
ACL users), replicas authenticate to the primary as a user of it, the Sentinels reach the servers as
another and may have their own password; the harness then asks the servers as the Sentinels' user.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from gputorrent.embedded import free_port
from tests.conftest import wait_for
from tests.netns import Host

REDIS_SERVER = "/usr/bin/redis-server"
MASTER_NAME = "pool"
START_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000
HOST_DATA_PORT = 6379
HOST_SENTINEL_PORT = 26379
LOOPBACK = "127.0.0.1"
Endpoint = tuple[str, int]


def redis_server_binary() -> str:
    """The Redis 7 server the Sentinel tests run, or a skip naming what is missing."""
    found = REDIS_SERVER if Path(REDIS_SERVER).is_file() else shutil.which("redis-server")
    if found is None:
        pytest.skip("Redis Sentinel tests need redis-server (Debian's redis-server package)")
    return found


@dataclass(frozen=True)
class ServerUsers:
    """The ACL users of a deployment whose servers turn the default user off."""

    acl: str  # the aclfile every data server loads, each its own copy
    replica: tuple[str, str]  # (masteruser, masterauth): how a replica authenticates to its primary
    sentinel: tuple[str, str]  # (auth-user, auth-pass): how the Sentinels reach the servers; the harness too
    sentinel_password: str | None = None  # the Sentinels' own `requirepass`


class RedisProcess:
    """One redis-server process (a Sentinel with `sentinel=True`) from config lines, and a client to ask it things."""

    def __init__(
        self, binary: str, workdir: Path, port: int, args: list[str], sentinel: bool = False,
        username: str | None = None, password: str | None = None, host: Host | None = None,
    ) -> None:  # fmt: skip
        self.port = port
        self.host = host
        self.address = host.address if host is not None else LOOPBACK
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / ("sentinel.conf" if sentinel else "redis.conf")
        self._log = (workdir / "server.log").open("wb")
        lines = [f"port {port}", f"bind {self.address}", f"dir {workdir}", *args]
        if host is not None:  # without a password protected mode would refuse every other host
            lines.append("protected-mode no")
        self.config.write_text("\n".join(lines) + "\n")  # a Sentinel rewrites its own file as it learns
        command = [binary, str(self.config), *(["--sentinel"] if sentinel else [])]
        self.process: subprocess.Popen[bytes]
        if host is not None:
            self.process = host.popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        else:
            self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = SyncRedis(host=self.address, port=port, decode_responses=True, socket_timeout=2,
                                socket_connect_timeout=1, username=username, password=password)  # fmt: skip

    @property
    def endpoint(self) -> Endpoint:
        return (self.address, self.port)

    @property
    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def ask(self, *command: str) -> object:
        """The reply to `command`, or None while the server cannot answer."""
        try:
            return self.client.execute_command(*command)
        except (RedisError, OSError):
            return None

    def kill(self) -> None:
        if self.running():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.client.close()
        self._log.close()


class Deployment:
    """Servers a test starts on entering (stopping what started if that fails half way) and stops
    on leaving: `start` and `stop` are the subclass's."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SentinelDeployment(Deployment):
    """A primary, `replicas` replicas and three Sentinels (quorum 2) watching them as `MASTER_NAME`."""

    def __init__(
        self, workdir: Path, replicas: int = 1, users: ServerUsers | None = None,
        hosts: Sequence[Host] | None = None, sentinel_hosts: Sequence[Host] | None = None,
        server_args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        assert hosts is None or len(hosts) == replicas + 1, "one host per data server"
        assert sentinel_hosts is None or len(sentinel_hosts) == 3, "one host per Sentinel"
        self.workdir = workdir
        self.replica_count = replicas
        self.hosts = list(hosts) if hosts is not None else None
        self.sentinel_hosts = list(sentinel_hosts) if sentinel_hosts is not None else None
        self.server_args = list(server_args)  # more redis.conf lines for every data server
        self.users = users
        self.binary = redis_server_binary()
        self.servers: list[RedisProcess] = []  # data servers, the first started as the primary
        self.sentinels: list[RedisProcess] = []

    def start(self) -> None:
        data_args = [
            'save ""', "appendonly no", "maxmemory-policy noeviction",
            # The default waits 5 s before the first full sync of a replica; nothing here is worth waiting for.
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0", *self.server_args,
        ]  # fmt: skip
        server_login: tuple[str | None, str | None] = (None, None)
        if self.users is not None:
            # masteruser/masterauth on the primary too: once demoted it must follow the new one.
            data_args += [f"masteruser {self.users.replica[0]}", f"masterauth {self.users.replica[1]}"]
            server_login = self.users.sentinel
        primary = self._data_server(0, data_args, server_login)
        self.servers.append(primary)
        for i in range(self.replica_count):
            args = [*data_args, f"replicaof {primary.address} {primary.port}"]
            self.servers.append(self._data_server(i + 1, args, server_login))
        for server in self.servers[1:]:
            wait_for(lambda s=server: self._replica_linked(s), START_TIMEOUT_S, f"replica on {server.port} in sync")
        sentinel_args = [
            f"sentinel monitor {MASTER_NAME} {primary.address} {primary.port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        sentinel_password = None
        if self.users is not None:
            sentinel_args += [
                f"sentinel auth-user {MASTER_NAME} {self.users.sentinel[0]}",
                f"sentinel auth-pass {MASTER_NAME} {self.users.sentinel[1]}",
            ]
            sentinel_password = self.users.sentinel_password
            if sentinel_password is not None:  # also what the Sentinels give each other
                sentinel_args.append(f"requirepass {sentinel_password}")
        for i in range(3):
            host = self.sentinel_hosts[i] if self.sentinel_hosts is not None else None
            port = HOST_SENTINEL_PORT if host is not None else free_port()
            workdir = self.workdir / f"sentinel-{i}"
            sentinel = RedisProcess(
                self.binary, workdir, port, sentinel_args, True, password=sentinel_password, host=host
            )
            self.sentinels.append(sentinel)
        for sentinel in self.sentinels:
            what = f"Sentinel on {sentinel.endpoint} to know the primary, its replicas and the other Sentinels"
            wait_for(lambda s=sentinel: self._sentinel_ready(s, primary.endpoint), START_TIMEOUT_S, what)

    def _data_server(self, index: int, args: list[str], login: tuple[str | None, str | None]) -> RedisProcess:
        host = self.hosts[index] if self.hosts is not None else None
        port = HOST_DATA_PORT if host is not None else free_port()
        workdir = self.workdir / f"redis-{index}"
        if self.users is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "users.acl").write_text(self.users.acl)
            args = [*args, f"aclfile {workdir / 'users.acl'}"]
        return RedisProcess(self.binary, workdir, port, args, username=login[0], password=login[1], host=host)

    def _replica_linked(self, server: RedisProcess) -> bool:
        info = server.ask("INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinel_ready(self, sentinel: RedisProcess, primary: Endpoint) -> bool:
        address = sentinel.ask("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        if not isinstance(address, list) or (address[0], int(address[1])) != primary:
            return False
        replicas = sentinel.ask("SENTINEL", "replicas", MASTER_NAME)
        others = sentinel.ask("SENTINEL", "sentinels", MASTER_NAME)
        return (
            isinstance(replicas, list) and len(replicas) == self.replica_count
            and isinstance(others, list) and len(others) == len(self.sentinels) - 1
        )  # fmt: skip

    @property
    def url(self) -> str:
        return self.url_for()

    def url_for(self, username: str | None = None, password: str | None = None) -> str:
        """The Sentinel URL for a client of the servers as `username` (and the Sentinels' own password)."""
        hosts = ",".join(f"{s.address}:{s.port}" for s in self.sentinels)
        login = f"{quote(username or '', safe='')}:{quote(password, safe='')}@" if password is not None else ""
        sentinel_password = self.users.sentinel_password if self.users is not None else None
        query = f"?sentinel_password={quote(sentinel_password, safe='')}" if sentinel_password is not None else ""
        return f"redis+sentinel://{login}{hosts}/{MASTER_NAME}{query}"

    def primary_endpoint(self, sentinels: Sequence[RedisProcess] | None = None) -> Endpoint | None:
        """The address every answering Sentinel (of `sentinels`, default all) names as the primary,
        None while they disagree or none answers."""
        named = set()
        for sentinel in self.sentinels if sentinels is None else sentinels:
            address = sentinel.ask("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
            if isinstance(address, list):
                named.add((str(address[0]), int(address[1])))
        return named.pop() if len(named) == 1 else None

    def primary_port(self) -> int | None:
        """The port of `primary_endpoint()` (on loopback every server has its own port)."""
        endpoint = self.primary_endpoint()
        return endpoint[1] if endpoint is not None else None

    def primary(self, sentinels: Sequence[RedisProcess] | None = None) -> RedisProcess:
        endpoint = self.primary_endpoint(sentinels)
        found = [s for s in self.servers if s.endpoint == endpoint]
        assert found, f"no server of the deployment is the primary the Sentinels name ({endpoint})"
        return found[0]

    def sentinels_off(self, host: Host) -> list[RedisProcess]:
        """The Sentinels on other hosts than `host`: the side that a cut of `host`'s link leaves together."""
        return [s for s in self.sentinels if s.host is None or s.host.name != host.name]

    def kill_primary(self) -> tuple[int, float]:
        """kill -9 the current primary; its port and the time the signal was sent."""
        primary = self.primary()
        at = time.time()
        primary.kill()
        return primary.port, at

    def wait_for_failover(self, old_port: int, timeout_s: float = FAILOVER_TIMEOUT_S) -> RedisProcess:
        """Until every Sentinel names another primary and that server says it is the primary."""
        old = next(s for s in self.servers if s.port == old_port)
        return self.wait_for_promotion(old, timeout_s=timeout_s)

    def wait_for_promotion(
        self, old: RedisProcess, sentinels: Sequence[RedisProcess] | None = None,
        timeout_s: float = FAILOVER_TIMEOUT_S,
    ) -> RedisProcess:  # fmt: skip
        """Until the Sentinels (`sentinels`, default all) name another primary than `old` and that
        server says it is the primary."""

        def promoted() -> bool:
            endpoint = self.primary_endpoint(sentinels)
            if endpoint is None or endpoint == old.endpoint:
                return False
            role = self.primary(sentinels).ask("ROLE")
            return isinstance(role, list) and role[0] == "master"

        wait_for(promoted, timeout_s, "a replica promoted to primary by the Sentinels")
        return self.primary(sentinels)

    def wait_for_replica_of(self, server: RedisProcess, primary: RedisProcess, timeout_s: float) -> None:
        """Until `server` follows `primary` with its link up (a demoted primary reconfigured by Sentinel)."""

        def follows() -> bool:
            role = server.ask("ROLE")  # ["slave", host, port, "connected", offset]
            return (
                isinstance(role, list) and role[0] == "slave"
                and (role[1], int(role[2])) == primary.endpoint and role[3] == "connected"
            )  # fmt: skip

        wait_for(follows, timeout_s, f"{server.endpoint} to follow {primary.endpoint} as a replica")

    def wait_for_agreement(self, timeout_s: float) -> RedisProcess:
        """Until the three Sentinels name one primary and every other server follows it with its link up.

        After a partition heals the Sentinels may fail over again (one that was cut off can reconfigure
        a server from its old view before it learns the new one), so this waits for whichever primary
        they settle on, and returns it."""

        def settled() -> bool:
            if self.primary_endpoint() is None:
                return False
            primary = self.primary()
            for server in self.servers:
                if server is primary:
                    continue
                role = server.ask("ROLE")
                if not (
                    isinstance(role, list) and role[0] == "slave"
                    and (role[1], int(role[2])) == primary.endpoint and role[3] == "connected"
                ):  # fmt: skip
                    return False
            return True

        wait_for(settled, timeout_s, "the Sentinels to agree on a primary that every other server follows")
        return self.primary()

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                server.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.workdir.name}\n{s.log[-3000:]}" for s in [*self.servers, *self.sentinels])
