"""Shared fixtures: a real Redis (the machine's, or a private one), the app in process, real processes."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gputorrent import auth, keys, redis_client
from gputorrent.client import APIClient
from gputorrent.config import CoordinatorSettings, WorkerSettings
from gputorrent.coordinator.app import create_app
from gputorrent.embedded import EmbeddedRedis, free_port
from gputorrent.protocol import Registered, WorkerRegistration
from gputorrent.redis_client import RedisClient
from gputorrent.worker.backends import Backend, Puller
from gputorrent.worker.backends.fake import FakeBackend
from gputorrent.worker.link import RedisLink
from gputorrent.worker.main import Worker
from tests.netns import Host, Network, unavailable_reason
from tests.ollama_standin import OllamaProtocolStandin

if TYPE_CHECKING:
    from tests.cluster import ClusterDeployment

# A server named by GPUTORRENT_TEST_REDIS_URL may hold other data: tests keep to one database of it.
TEST_DB = 13
PROCESS_START_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A socket or file a test leaks is reported (filterwarnings=error) in that test, not a random later one."""
    yield
    gc.collect()


# `GPUTORRENT_TEST_CELLS=N`: run the tests with the pool in N cells on the one test Redis, as a
# Redis Cluster would partition it (docs/architecture.md, "Redis Cluster"), every script's keys
# checked to be of one cell.
TEST_CELLS = int(os.environ.get("GPUTORRENT_TEST_CELLS", "1"))


@pytest.fixture(autouse=True)
def _keys_named_for_one_redis_after_each_test() -> Iterator[None]:
    """A test that made a client for a Redis Cluster named every key for it (`keys.use_cluster_layout`):
    the next test names them for one Redis again."""
    keys.use_cells(tuple(f"{{t{cell}}}" for cell in range(TEST_CELLS)) if TEST_CELLS > 1 else ("",))
    yield
    keys.use_cluster_layout(False)


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """`GPUTORRENT_TEST_REDIS_URL` when set, else a private server for the session.

    Private by default: tests flush their database, and two runs sharing one server (two
    checkouts on one machine) would flush each other's workers and jobs.
    """
    given = os.environ.get("GPUTORRENT_TEST_REDIS_URL")
    if given:
        yield given
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """The test database, empty before and after each test."""
    url = f"{redis_server_url}/{TEST_DB}"
    client = SyncRedis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    """A real Redis Cluster of three primaries (tests/cluster.py), one per module that asks."""
    from tests.cluster import ClusterDeployment  # tests/cluster.py imports this module

    with ClusterDeployment(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def cluster_url(cluster: ClusterDeployment) -> Iterator[str]:
    """The `redis+cluster://` URL of `cluster`, empty before and after each test: a module whose tests
    run on the cluster returns it as its `redis_url`."""
    for node in cluster.primaries():
        node.client.flushall()
    yield cluster.url
    for node in cluster.primaries():
        node.client.flushall()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    """A client of `redis_url` as the project makes one (a module may give a cluster's URL)."""
    client = redis_client.async_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def coordinator_settings(redis_url: str, request: pytest.FixtureRequest) -> CoordinatorSettings:
    """Fast heartbeats; a test may add settings with `@pytest.mark.parametrize("coordinator_settings",
    [{...}], indirect=True)`."""
    values = {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 2.0, **getattr(request, "param", {})}
    return CoordinatorSettings(redis_url=redis_url, **values)


@pytest.fixture
async def admin_key(redis: Redis) -> str:
    """An admin API key in the test database."""
    _, key = await auth.create_key(redis, "tests", "admin")
    return key


@pytest.fixture
async def api(coordinator_settings: CoordinatorSettings, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the coordinator app in process, lifespan included, with an admin key."""
    app = create_app(coordinator_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {admin_key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://coordinator", headers=headers) as client:
            yield client


@pytest.fixture
async def ollama_protocol_standin() -> AsyncIterator[OllamaProtocolStandin]:
    """A stand-in for Ollama's documented protocol (NOT Ollama; see tests/ollama_standin.py) on this test's loop."""
    standin = OllamaProtocolStandin()
    await standin.start()
    yield standin
    await standin.stop()


@pytest.fixture
def fake_worker(api: httpx.AsyncClient, redis: Redis, redis_url: str) -> Callable[..., Awaitable[Worker]]:
    """Register an in-process worker on the fake backend (or `backend`, loaded with `model`); run it with
    `await worker.run(stop, burst=True)`. Other keyword arguments are `WorkerSettings` fields."""

    async def make(
        worker_id: str,
        model: str = "fake",
        token_delay_s: float = 0.0,
        backend: Backend | None = None,
        **settings_values: object,
    ) -> Worker:
        backend = backend or FakeBackend(token_delay_s=token_delay_s)
        body = WorkerRegistration(
            worker_id=worker_id, models=[model], backend=backend.name, can_pull=isinstance(backend, Puller)
        )
        response = await api.post("/register", json=body.model_dump(mode="json"))
        assert response.status_code == 200, response.text
        await backend.load(model)
        settings = WorkerSettings(
            redis_url=redis_url, backend="fake", model_name=model, worker_id=worker_id, **settings_values
        )
        registered = Registered.model_validate(response.json())
        link = RedisLink(
            redis, redis_url, worker_id, heartbeat_ttl_s=registered.heartbeat_timeout_s,
            max_attempts=settings.max_attempts, result_ttl_s=settings.result_ttl_s,
            registered_at=registered.registered_at,
        )  # fmt: skip
        return Worker(link, backend, registered, settings, model)

    return make


@pytest.fixture
def netns_hosts() -> Iterator[Callable[..., dict[str, Host]]]:
    """Hosts on real links (tests/netns.py): `hosts = netns_hosts("redis", "c1", "w1")`, then
    `hosts["w1"].popen([...])`, `.cut()`, `.restore()`. Skips the test where namespaces cannot be made;
    every namespace, veth and the bridge are removed after the test, whatever its outcome."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    networks: list[Network] = []

    def make(*names: str) -> dict[str, Host]:
        network = Network()
        networks.append(network)
        return {name: network.add(name) for name in names}

    yield make
    for network in networks:
        network.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    """Poll the async `condition` until it holds (state in Redis has no event to wait on); fail with `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


SECURITY_DOC = Path(__file__).parents[1] / "docs" / "security.md"


def with_test_passwords(text: str) -> str:
    """Each `NAME_PASSWORD` placeholder of the docs as the tests' password `name-pw`
    (`COORDINATOR_PASSWORD` -> `coordinator-pw`, `SENTINEL_USER_PASSWORD` -> `sentinel-user-pw`)."""
    return re.sub(r"\b([A-Z][A-Z_]*)_PASSWORD\b", lambda m: m.group(1).lower().replace("_", "-") + "-pw", text)


def documented_users_acl() -> str:
    """The users.acl block of docs/security.md, the doc being what is tested, `with_test_passwords`."""
    block = re.search(r"```\n# users\.acl.*?\n(.*?)```", SECURITY_DOC.read_text(), re.S)
    assert block is not None, "docs/security.md has no users.acl block"
    return with_test_passwords(block.group(1))


def keys_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`gputorrent keys ARGS` against `redis_url`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gputorrent", "keys", "--redis-url", redis_url, *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def new_key(redis_url: str, scope: str, name: str = "tests") -> str:
    """A new API key of `scope`, made with `gputorrent keys create`."""
    return keys_cli(redis_url, "create", "--name", name, "--scope", scope).stdout.strip()


class Process:
    """A `python -m gputorrent ...` child with its output in a log file; stopped on teardown."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gputorrent", *args],  # `prefix`: on another host (`ip netns exec`)
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._log.close()
        return code


def wait_until_alive(worker: Process, worker_id: str, url: str, api_key: str) -> None:
    """Wait until the coordinator at `url` lists the worker alive; fail with its log if its process exits first."""
    with APIClient(url, api_key=api_key) as client:
        wait_for(
            lambda: worker.popen.poll() is not None
            or any(w.worker_id == worker_id and w.state == "alive" for w in client.workers()),
            PROCESS_START_TIMEOUT_S, f"worker {worker_id}",
        )  # fmt: skip
    assert worker.popen.poll() is None, worker.log


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str = "process") -> Process:
        proc = Process(list(args), tmp_path / f"{name}-{len(started)}.log", env)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def healthy(coordinator_url: str) -> bool:
    """Whether the coordinator answers `GET /health` with 200 now."""
    return _get_json(f"{coordinator_url}/health") is not None


def _get_json(url: str) -> object | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture
def coordinator_url(processes: Callable[..., Process], redis_url: str) -> str:
    """A coordinator process on a free port, answering /health."""
    port = free_port()
    # Authentication off (loopback only): these tests are about the pool; tests/e2e/test_auth.py covers keys.
    proc = processes("coordinator", "--port", str(port), "--redis-url", redis_url, name="coordinator",
                     env={"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "4",
                          "GPUTORRENT_AUTH": "off"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: (proc.popen.poll() is None and _get_json(f"{url}/health") is not None) or _exited(proc),
             PROCESS_START_TIMEOUT_S, "the coordinator's /health")  # fmt: skip
    assert proc.popen.poll() is None, proc.log
    return url


def _exited(proc: Process) -> bool:
    return proc.popen.poll() is not None


def alive_workers(coordinator_url: str) -> list[str]:
    workers = _get_json(f"{coordinator_url}/workers") or []
    assert isinstance(workers, list)
    return [w["worker_id"] for w in workers if w["state"] == "alive"]


@pytest.fixture
def start_worker(processes: Callable[..., Process], coordinator_url: str, redis_url: str) -> Callable[..., Process]:
    """Start a worker process and wait until the coordinator lists it alive."""

    def start(
        worker_id: str,
        *extra: str,
        backend: str = "fake",
        env: dict[str, str] | None = None,
        timeout_s: float = PROCESS_START_TIMEOUT_S,
    ) -> Process:
        proc = processes(
            "worker", "--backend", backend, "--coordinator", coordinator_url, "--redis-url", redis_url,
            "--worker-id", worker_id, *extra, env=env, name=f"worker-{worker_id}",
        )  # fmt: skip
        wait_for(lambda: worker_id in alive_workers(coordinator_url) or _exited(proc), timeout_s, f"worker {worker_id}")
        assert proc.popen.poll() is None, proc.log
        return proc

    return start


class StreamReader(threading.Thread):
    """One client reading a native SSE stream to its end, keeping every event in order."""

    def __init__(self, url: str, body: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[tuple[str, dict[str, object]]] = []

    def run(self) -> None:
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{self.url}/inference", json=self.body) as reply:
            event = ""
            for line in reply.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((event, json.loads(line.removeprefix("data: "))))

    def tokens(self) -> int:
        return sum(1 for event, _ in self.events if event == "token")

    def text(self) -> str:
        return "".join(str(data["text"]) for event, data in self.events if event == "token")

    def result(self) -> dict[str, object]:
        """The last event, which must be the job's result."""
        event, data = self.events[-1]
        assert event == "result", self.events[-3:]
        return data
