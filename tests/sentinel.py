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
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

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


class _Server:
    """One redis-server process and a client to ask it things."""

    def __init__(self, binary: str, workdir: Path, port: int, args: list[str], sentinel: bool = False) -> None:
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
                                socket_connect_timeout=1)  # fmt: skip

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

    def __init__(self, workdir: Path, replicas: int = 1) -> None:
        self.workdir = workdir
        self.replica_count = replicas
        self.binary = redis_server_binary()
        self.servers: list[_Server] = []  # data servers, the first started as the primary
        self.sentinels: list[_Server] = []

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
        primary_port = free_port()
        self.servers.append(_Server(self.binary, self.workdir / "redis-0", primary_port, data_args))
        for i in range(self.replica_count):
            port = free_port()
            args = [*data_args, f"replicaof 127.0.0.1 {primary_port}"]
            self.servers.append(_Server(self.binary, self.workdir / f"redis-{i + 1}", port, args))
        for server in self.servers[1:]:
            wait_for(lambda s=server: self._replica_linked(s), START_TIMEOUT_S, f"replica on {server.port} in sync")
        sentinel_args = [
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        for i in range(3):
            self.sentinels.append(
                _Server(self.binary, self.workdir / f"sentinel-{i}", free_port(), sentinel_args, sentinel=True)
            )
        for sentinel in self.sentinels:
            what = f"Sentinel on {sentinel.port} to know the primary, its replicas and the other Sentinels"
            wait_for(lambda s=sentinel: self._sentinel_ready(s, primary_port), START_TIMEOUT_S, what)

    def _replica_linked(self, server: _Server) -> bool:
        info = server.ask("INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinel_ready(self, sentinel: _Server, primary_port: int) -> bool:
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
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def primary_port(self) -> int | None:
        """The port every answering Sentinel names as the primary, None while they disagree or none answers."""
        named = set()
        for sentinel in self.sentinels:
            address = sentinel.ask("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
            if isinstance(address, list):
                named.add(int(address[1]))
        return named.pop() if len(named) == 1 else None

    def primary(self) -> _Server:
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

    def wait_for_failover(self, old_port: int, timeout_s: float = FAILOVER_TIMEOUT_S) -> _Server:
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
