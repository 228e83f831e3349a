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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from gputorrent.embedded import free_port
from tests.conftest import wait_for

REDIS_SERVER = "/usr/bin/redis-server"
MASTER_NAME = "pool"
START_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


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
        username: str | None = None, password: str | None = None,
    ) -> None:  # fmt: skip
        self.port = port
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / ("sentinel.conf" if sentinel else "redis.conf")
        self._log = (workdir / "server.log").open("wb")
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {workdir}", *args]
        self.config.write_text("\n".join(lines) + "\n")  # a Sentinel rewrites its own file as it learns
        command = [binary, str(self.config), *(["--sentinel"] if sentinel else [])]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = SyncRedis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2,
                                socket_connect_timeout=1, username=username, password=password)  # fmt: skip

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


class SentinelDeployment:
    """A primary, `replicas` replicas and three Sentinels (quorum 2) watching them as `MASTER_NAME`."""

    def __init__(self, workdir: Path, replicas: int = 1, users: ServerUsers | None = None) -> None:
        self.workdir = workdir
        self.replica_count = replicas
        self.users = users
        self.binary = redis_server_binary()
        self.servers: list[RedisProcess] = []  # data servers, the first started as the primary
        self.sentinels: list[RedisProcess] = []

    def __enter__(self) -> SentinelDeployment:
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

    def start(self) -> None:
        data_args = [
            'save ""', "appendonly no", "maxmemory-policy noeviction",
            # The default waits 5 s before the first full sync of a replica; nothing here is worth waiting for.
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0",
        ]  # fmt: skip
        server_login: tuple[str | None, str | None] = (None, None)
        if self.users is not None:
            # masteruser/masterauth on the primary too: once demoted it must follow the new one.
            data_args += [f"masteruser {self.users.replica[0]}", f"masterauth {self.users.replica[1]}"]
            server_login = self.users.sentinel
        primary_port = free_port()
        self.servers.append(self._data_server("redis-0", primary_port, data_args, server_login))
        for i in range(self.replica_count):
            port = free_port()
            args = [*data_args, f"replicaof 127.0.0.1 {primary_port}"]
            self.servers.append(self._data_server(f"redis-{i + 1}", port, args, server_login))
        for server in self.servers[1:]:
            wait_for(lambda s=server: self._replica_linked(s), START_TIMEOUT_S, f"replica on {server.port} in sync")
        sentinel_args = [
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2",
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
            workdir, port = self.workdir / f"sentinel-{i}", free_port()
            self.sentinels.append(
                RedisProcess(self.binary, workdir, port, sentinel_args, True, password=sentinel_password)
            )
        for sentinel in self.sentinels:
            what = f"Sentinel on {sentinel.port} to know the primary, its replicas and the other Sentinels"
            wait_for(lambda s=sentinel: self._sentinel_ready(s, primary_port), START_TIMEOUT_S, what)

    def _data_server(self, name: str, port: int, args: list[str], login: tuple[str | None, str | None]) -> RedisProcess:
        workdir = self.workdir / name
        if self.users is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "users.acl").write_text(self.users.acl)
            args = [*args, f"aclfile {workdir / 'users.acl'}"]
        return RedisProcess(self.binary, workdir, port, args, username=login[0], password=login[1])

    def _replica_linked(self, server: RedisProcess) -> bool:
        info = server.ask("INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinel_ready(self, sentinel: RedisProcess, primary_port: int) -> bool:
        address = sentinel.ask("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        if not isinstance(address, list) or int(address[1]) != primary_port:
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
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        login = f"{quote(username or '', safe='')}:{quote(password, safe='')}@" if password is not None else ""
        sentinel_password = self.users.sentinel_password if self.users is not None else None
        query = f"?sentinel_password={quote(sentinel_password, safe='')}" if sentinel_password is not None else ""
        return f"redis+sentinel://{login}{hosts}/{MASTER_NAME}{query}"

    def primary_port(self) -> int | None:
        """The port every answering Sentinel names as the primary, None while they disagree or none answers."""
        named = set()
        for sentinel in self.sentinels:
            address = sentinel.ask("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
            if isinstance(address, list):
                named.add(int(address[1]))
        return named.pop() if len(named) == 1 else None

    def primary(self) -> RedisProcess:
        port = self.primary_port()
        found = [s for s in self.servers if s.port == port]
        assert found, f"no server of the deployment is the primary the Sentinels name ({port})"
        return found[0]

    def kill_primary(self) -> tuple[int, float]:
        """kill -9 the current primary; its port and the time the signal was sent."""
        primary = self.primary()
        at = time.time()
        primary.kill()
        return primary.port, at

    def wait_for_failover(self, old_port: int, timeout_s: float = FAILOVER_TIMEOUT_S) -> RedisProcess:
        """Until every Sentinel names another primary and that server says it is the primary."""

        def promoted() -> bool:
            port = self.primary_port()
            if port is None or port == old_port:
                return False
            role = self.primary().ask("ROLE")
            return isinstance(role, list) and role[0] == "master"

        wait_for(promoted, timeout_s, "a replica promoted to primary by the Sentinels")
        return self.primary()

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                server.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.workdir.name}\n{s.log[-3000:]}" for s in [*self.servers, *self.sentinels])
