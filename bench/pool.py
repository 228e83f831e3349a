"""Starting what a benchmark measures: a private Redis, a coordinator, workers, the fast server, LiteLLM's proxy.

Every benchmark runs the pool as users run it: authentication on (a client key checked and
counted on every request, a join key for each worker) and the default routing, unless it
measures routing itself. `Processes` stops whatever it started, last first, when its block ends.

    with EmbeddedRedis() as redis, Processes() as procs:
        pool = start_pool(procs, redis.url)
        pool.add_worker(["--backend", "fake"])
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from gputorrent import auth, redis_client
from gputorrent.embedded import free_port
from gputorrent.up import terminate

HERE = Path(__file__).parent
RESULTS = HERE / "results"
# Raised only so a benchmark's load is not refused; every request is still checked and counted.
BENCH_RATE_LIMIT_RPM = "100000000"


class Processes:
    """Child processes of one benchmark run, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(command), env={**os.environ, **(env or {})}, **kwargs)
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
        terminate(child, timeout_s)
        if child in self.children:
            self.children.remove(child)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def gputorrent(*args: str) -> list[str]:
    """The command line of a `gputorrent` subcommand, run by this interpreter (so from this environment)."""
    return [sys.executable, "-m", "gputorrent", "--log-level", "warning", *args]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def wait_http(url: str, headers: dict[str, str] | None = None, timeout_s: float = 60) -> None:
    wait_until(lambda: httpx.get(url, headers=headers, timeout=2).status_code == 200, url, timeout_s)


async def _keys(redis_url: str) -> tuple[str, str]:
    redis = redis_client.async_client(redis_url)  # a cluster's URL too (bench/scale.py)
    try:
        _, client_key = await auth.create_key(redis, "bench", "client")
        _, join_key = await auth.create_key(redis, "bench worker", "join")
    finally:
        await redis.aclose()
    return client_key, join_key


@dataclass
class Pool:
    """A coordinator with authentication on, the keys to use it, and the workers started for it."""

    procs: Processes
    redis_url: str
    url: str
    client_key: str
    join_key: str
    coordinator: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    command: Callable[..., list[str]] = gputorrent  # a subcommand's command line

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.client_key}"}

    def add_worker(self, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A worker process (`gputorrent worker ARGS`) that joins with the pool's join key."""
        command = self.command("worker", *args, "--coordinator", self.url, "--redis-url", self.redis_url)
        worker = self.procs.start(command, {"GPUTORRENT_JOIN_TOKEN": self.join_key, **(env or {})})
        self.workers.append(worker)
        return worker

    def restart_coordinator(self, env: dict[str, str] | None = None) -> None:
        """Replace the coordinator with one on a new port (the workers stay; the keys live in Redis)."""
        self.procs.stop(self.coordinator)
        self.url, self.coordinator = _coordinator(self.procs, self.redis_url, env, self.command)

    def workers_alive(self) -> list[dict[str, Any]]:
        listed = httpx.get(f"{self.url}/workers", headers=self.headers, timeout=5).json()
        return [w for w in listed if w["state"] == "alive"]

    def wait_for_workers(self, count: int, timeout_s: float = 120) -> None:
        wait_until(lambda: len(self.workers_alive()) >= count, f"{count} workers", timeout_s)

    def wait_for_model(self, model: str, timeout_s: float = 120) -> None:
        def served() -> bool:
            return model in httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=5).text

        wait_until(served, f"a worker serving {model}", timeout_s)


def _coordinator(
    procs: Processes, redis_url: str, env: dict[str, str] | None, command: Callable[..., list[str]]
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {"GPUTORRENT_RATE_LIMIT_RPM": BENCH_RATE_LIMIT_RPM, **(env or {})}
    child = procs.start(command("coordinator", "--port", str(port), "--redis-url", redis_url), env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    return url, child


def start_pool(
    procs: Processes,
    redis_url: str,
    coordinator_env: dict[str, str] | None = None,
    command: Callable[..., list[str]] = gputorrent,
) -> Pool:
    """A coordinator on a free port with authentication on, and a client key and a join key in its Redis.
    `command`: a subcommand's command line, for the coordinator and the workers (`gputorrent` by default)."""
    client_key, join_key = asyncio.run(_keys(redis_url))
    url, coordinator = _coordinator(procs, redis_url, coordinator_env, command)
    return Pool(procs, redis_url, url, client_key, join_key, coordinator, command=command)


def start_fast_server(procs: Processes, gap_ms: float = 0.0) -> str:
    """bench/fast_openai_server.py on a free port; its OpenAI base URL (`.../v1`)."""
    port = free_port()
    command = [sys.executable, str(HERE / "fast_openai_server.py"), "--port", str(port), "--gap-ms", str(gap_ms)]
    procs.start(command)
    base = f"http://127.0.0.1:{port}/v1"
    wait_http(f"{base}/models")
    return base


@dataclass(frozen=True)
class BareRelay:
    """bench/bare_relay.py running: its base URL (`.../v1`) and its two processes."""

    url: str
    relay_pid: int
    worker_pid: int


def start_bare_relay(procs: Processes, redis_url: str, backend_base: str, *, on_fastapi: bool = False) -> BareRelay:
    """bench/bare_relay.py (the bare hops, raw or `on_fastapi`) in front of a backend, on a free port."""
    redis_port, backend_port, port = urlsplit(redis_url).port, urlsplit(backend_base).port, free_port()
    relay_script = str(HERE / "bare_relay.py")
    relay = procs.start(
        [sys.executable, relay_script, "relay-fastapi" if on_fastapi else "relay", str(redis_port), str(port)]
    )
    worker = procs.start([sys.executable, relay_script, "worker", str(redis_port), str(backend_port), str(port)])
    base = f"http://127.0.0.1:{port}/v1"
    wait_http(base)
    return BareRelay(base, relay.pid, worker.pid)


def process_cpu_s(*pids: int) -> float:
    """The CPU time (user and system, seconds) these processes and their children have used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        process = psutil.Process(pid)
        for each in [process, *process.children(recursive=True)]:
            times = each.cpu_times()
            total += times.user + times.system
    return total


def redis_cpu_s(redis_url: str) -> float:
    """The CPU time (seconds) the Redis-compatible server at `redis_url` has used so far (INFO's used_cpu_*)."""
    from redis import Redis as SyncRedis

    with SyncRedis.from_url(redis_url) as redis:
        info = redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


LITELLM_MASTER_KEY = "sk-bench-litellm"  # LiteLLM's proxy checks it on every request, as ours checks a client key


def litellm_missing() -> str | None:
    """Why LiteLLM's proxy cannot run from this environment, or None when it can (nothing is imported)."""
    from importlib.util import find_spec

    if find_spec("litellm") is None or _litellm_executable() is None:
        return "LiteLLM's proxy is not installed here; `make bench` installs litellm[proxy] in bench/.venv"
    return None


def _litellm_executable() -> str | None:
    return shutil.which("litellm", path=str(Path(sys.executable).parent))


class PeerFailed(RuntimeError):
    """A peer compared against did not start; the message says why."""


def start_litellm(procs: Processes, backend_base: str, *, workers: int = 1, timeout_s: float = 300) -> str:
    """LiteLLM's proxy on a free port in front of an OpenAI-compatible backend, with a master key; its URL.

    One model entry routes `fast` to the backend; no database, telemetry off, and its model price
    list read from the package (the machines have no network but the package registries).
    `workers` is its `--num_workers` (uvicorn processes; its default is 1). Raises PeerFailed, with
    the end of its log, when it exits or does not answer within `timeout_s`.
    """
    model = "fast"
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": backend_base, "api_key": "unused"},
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    executable = _litellm_executable() or "litellm"
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    command = [executable, "--config", str(folder / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--num_workers", str(workers)]
    log = folder / "litellm.log"
    with log.open("wb") as out:
        child = procs.start(command, env, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if child.poll() is not None:
            raise PeerFailed(f"LiteLLM's proxy exited ({child.returncode}): {log.read_text()[-1500:]}")
        return httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200

    try:
        wait_until(answers, "LiteLLM's proxy", timeout_s)
    except RuntimeError as e:
        if isinstance(e, PeerFailed):
            raise
        procs.stop(child)
        raise PeerFailed(f"LiteLLM's proxy did not answer in {timeout_s:.0f} s: {log.read_text()[-1500:]}") from e
    return url


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p99, mean and max of a sample."""
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean": statistics.fmean(ordered),
        "max": ordered[-1],
    }


def save_plot(fig: Any, out: Path) -> None:
    """Write a benchmark's matplotlib figure to `out` at the size docs/ shows, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_result(name: str, result: dict[str, Any]) -> Path:
    """bench/results/NAME.json, with the machine it ran on."""
    result = {**result, "machine": machine()}
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def machine() -> dict[str, Any]:
    import platform

    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
