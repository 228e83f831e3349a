"""The fault harness's `Pool` on separate hosts (tests/netns.py): each process on a host of its own.

Redis runs on the `redis` host bound to that host's address; each coordinator named `cN` runs on
host `cN` (`gputorrent coordinator --host ADDR --port 8000`); each worker `wN` on host `wN`
(`--coordinator http://C:8000 --redis-url redis://R:6379`). Off loopback a coordinator refuses
to run without authentication, so the pool makes keys: an admin key the harness sends with every
request, and a join key the workers register with.

The verdict is the fault suite's (`Outcome`), read by the test process as an observer on the bridge
(see tests/netns.py), whom no cut reaches: its subscriber counts announcements, its reads find
each result. Requests meant to come from a host go through `submit_from(host, ...)` or a
`HostLoad`, which run them inside that host's namespace.

With `redis=` the pool runs on a Redis the test placed itself, such as a Sentinel deployment on
hosts of its own (tests/sentinel.py, `SentinelDeployment(hosts=...)`): coordinators and workers
then get its `redis+sentinel://` URL, which names the Sentinels by their hosts' addresses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Protocol

import httpx

from gputorrent.embedded import EmbeddedRedis, server_binary
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, wait_for
from tests.faults.harness import Load, Pool, Submitted
from tests.netns import Host

REDIS_PORT = 6379
COORDINATOR_PORT = 8000


class HostRedis(EmbeddedRedis):
    """The pool's Redis on its own host, listening on the host's address only."""

    def __init__(self, host: Host, *, appendonly: bool = False) -> None:
        super().__init__(REDIS_PORT, appendonly=appendonly)
        self.host = host

    @property
    def url(self) -> str:
        return f"redis://{self.host.address}:{self.port}"

    def start(self, **popen_kwargs: object) -> HostRedis:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else ["--appendonly", "no"]
        )
        args = [
            server_binary(), "--port", str(self.port), "--bind", self.host.address, "--dir", self._dir.name,
            "--save", "", *persistence,
            # No password on a private test subnet: protected mode would refuse every host but loopback.
            "--protected-mode", "no", "--maxmemory-policy", "noeviction", "--loglevel", "warning",
        ]  # fmt: skip
        self._process = self.host.popen(args, stdout=subprocess.DEVNULL)
        process = self._process
        wait_for(lambda: process.poll() is not None or _pings(self.url), 10, f"Redis on {self.host.address}")
        assert process.poll() is None, f"Redis exited at start (code {process.returncode})"
        return self


def _pings(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


class RedisService(Protocol):
    """What the pool needs of its Redis: the URL it gives every process, and a way to stop it."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


class HostPool(Pool):
    """`Pool` whose Redis, coordinators and workers each run on the host of the same name."""

    def __init__(
        self, tmp_path: Path, hosts: dict[str, Host], *, max_attempts: int = 3, redis: RedisService | None = None
    ) -> None:
        self.hosts = hosts
        if redis is None:
            redis = HostRedis(hosts["redis"]).start()
        self.admin_key = _new_key(redis.url, "admin")
        self.join_key = _new_key(redis.url, "join")
        self._host_http: dict[str, httpx.Client] = {}
        super().__init__(
            tmp_path,
            redis,  # type: ignore[arg-type]  # the pool reads only `.url` (and `stop()` below)
            max_attempts=max_attempts,
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> Process:
        host = self.hosts[name.removeprefix("worker-")]
        if args[0] == "worker":
            env = {**env, "GPUTORRENT_JOIN_TOKEN": self.join_key}
        proc = Process(args, self.tmp_path / f"{name}-{len(self.all_processes)}.log", env, prefix=host.prefix)
        self.all_processes.append(proc)
        return proc

    def coordinator(self, name: str = "c1") -> str:
        """Start a coordinator on host `name`, listening on its address; its URL once /health answers."""
        env = {key: value for key, value in self.coordinator_env().items() if key != "GPUTORRENT_AUTH"}
        address = self.hosts[name].address
        args = ["coordinator", "--host", address, "--port", str(COORDINATOR_PORT), "--redis-url", self.redis_url]
        proc = self._spawn(args, name, env)
        url = f"http://{address}:{COORDINATOR_PORT}"
        self.coordinators[name] = (url, proc)
        wait_for(
            lambda: self._healthy(url) or proc.popen.poll() is not None, PROCESS_START_TIMEOUT_S, f"{name} /health"
        )
        assert proc.popen.poll() is None, proc.log
        return url

    def wait_alive(self, worker_id: str) -> None:
        """Until the worker beats (its heartbeat key exists), and then until its coordinator lists it
        alive: that listing reads the pool afresh, so the coordinator's next admission routes on a read
        that has the worker (an admission may route on a read up to a second old)."""
        proc = self.workers[worker_id]
        wait_for(
            lambda: proc.popen.poll() is not None or self.is_alive(worker_id),
            PROCESS_START_TIMEOUT_S,
            f"worker {worker_id} alive",
        )
        assert proc.popen.poll() is None, proc.log
        wait_for(lambda: self.listed_alive(worker_id), PROCESS_START_TIMEOUT_S, f"worker {worker_id} listed alive")

    def listed_alive(self, worker_id: str) -> bool:
        """Whether every running coordinator lists the worker alive. A listing reads the pool afresh, so
        each coordinator's next admission routes on a read that has the worker as it is now (a client
        of any coordinator may be routed to it, not only one of the coordinator it registered with)."""
        for url, proc in self.coordinators.values():
            if proc.popen.poll() is not None:
                continue
            try:
                response = self.http.get(f"{url}/workers")
            except httpx.TransportError:  # cut off from this host just now: not listed yet
                return False
            if response.status_code != 200:  # a 503 while its Redis fails over, say
                return False
            if not any(w["worker_id"] == worker_id and w["state"] == "alive" for w in response.json()):
                return False
        return True

    def http_on(self, host: str) -> httpx.Client:
        """An HTTP client for requests made from `host`; use it only inside `hosts[host].entered()`."""
        if host not in self._host_http:
            self._host_http[host] = httpx.Client(timeout=10, headers=self.headers)
        return self._host_http[host]

    def submit_from(self, host: str, prompt: str, *, coordinator: str = "c1", max_tokens: int = 64) -> Submitted | None:
        """`submit`, sent from `host` (its namespace, its link)."""
        with self.hosts[host].entered():
            return self.submit(prompt, coordinator=coordinator, max_tokens=max_tokens, http=self.http_on(host))

    def forget_connections(self) -> None:
        """Drop the observer's Redis connections (they may hang on a primary cut off), so its next
        command asks the Sentinels where the primary is now."""
        self.client.connection_pool.disconnect()

    def close(self) -> None:
        super().close()
        for client in self._host_http.values():
            client.close()
        self.redis.stop()


class HostLoad(Load):
    """A `Load` whose requests leave from `host`."""

    def __init__(self, pool: HostPool, host: str, **kwargs: object) -> None:
        super().__init__(pool, **kwargs)  # type: ignore[arg-type]
        self.host = pool.hosts[host]

    def run(self) -> None:
        with self.host.entered():
            super().run()


def _new_key(redis_url: str, scope: str) -> str:
    """An API key made as an operator makes one (`gputorrent keys create`)."""
    done = subprocess.run(
        [sys.executable, "-m", "gputorrent", "keys", "--redis-url", redis_url, "create", "--name", "netns-tests",
         "--scope", scope],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()
