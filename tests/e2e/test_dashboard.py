"""The dashboard and the playground in headless Chromium (Debian's, driven by playwright-core) against a live pool.

Each test runs tests/browser/drive.mjs, which prints what the page showed; screenshots go to
test-artifacts/ (git-ignored). `make test` installs what these need (npm ci, Debian's chromium).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gputorrent import auth, keys, redis_client
from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.errors import JobFailed
from gputorrent.protocol import Heartbeat
from gputorrent.worker.backends.fake import FAIL_TRIGGER
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, wait_for

ROOT = Path(__file__).resolve().parents[2]
DRIVER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
StartWorker = Callable[..., Process]


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (DRIVER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (npm ci --prefix tests/browser)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def drive() -> Callable[..., dict[str, Any]]:
    """Run one scenario of drive.mjs; returns its report. Skips where the browser is missing, fails in CI."""
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run: {missing}; `make test` installs it")
        pytest.skip(f"{missing}; `make test` installs it")
    ARTIFACTS.mkdir(exist_ok=True)

    def run(scenario: str, url: str, screenshot: str, **options: object) -> dict[str, Any]:
        shot = ARTIFACTS / screenshot
        shot.unlink(missing_ok=True)
        done = subprocess.run(
            ["node", "drive.mjs", scenario, url, str(shot), json.dumps(options)],
            cwd=DRIVER_DIR, capture_output=True, text=True, timeout=100, env={**os.environ, "CHROMIUM_PATH": CHROMIUM},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["errors"] == [], report
        assert shot.stat().st_size > 10_000, "the screenshot is missing or blank"
        return report

    return run


def test_the_dashboard_shows_the_workers_their_states_jobs_and_failures(
    coordinator_url: str, redis_url: str, start_worker: StartWorker, drive: Callable[..., dict[str, Any]]
) -> None:
    start_worker("w1")
    with APIClient(coordinator_url) as client:
        for i in range(2):
            assert client.infer("fake", f"job {i}").status == "completed"
        with pytest.raises(JobFailed):
            client.infer("fake", f"please {FAIL_TRIGGER}")
    # Two more registrations, whose heartbeats say what a sick and a dead worker's would.
    for worker_id in ("sick", "gone"):
        body = {"worker_id": worker_id, "models": ["other"], "backend": "ollama"}
        assert httpx.post(f"{coordinator_url}/register", json=body).status_code == 200
    # A leader of a split model registers where its parts lie, as tests/e2e/test_split_model.py's do.
    hosts = [
        {"shard_id": None, "address": "leader", "port": None, "layers": 1, "memory_bytes": 0},
        {"shard_id": "s1", "address": "10.0.0.2", "port": 50052, "layers": 30, "memory_bytes": 8 * 2**30},
    ]
    body = {"worker_id": "leader", "models": ["big"], "backend": "llamacpp", "group": {"hosts": hosts}}
    assert httpx.post(f"{coordinator_url}/register", json=body).status_code == 200
    sick = Heartbeat(at=time.time(), condition="unhealthy", reason="the backend cannot generate: connection refused")
    with redis_client.sync_client(redis_url) as redis:
        redis.set(keys.heartbeat_key("sick"), sick.model_dump_json(), px=60_000)
        redis.delete(keys.heartbeat_key("gone"))
        # A fetch announced, as `POST /swarm/fetch` records it (the catalogue has no file of "big" here).
        redis.zadd(keys.swarm_fetching(), {"big 10.0.0.9 6881": time.time() + 600})
    # A worker fetching a model from the swarm says how it goes, as tests/e2e/test_swarm_models.py's do.
    progress = {"model": "big", "peer": {"address": "10.0.0.9", "port": 6881}, "done_bytes": 3 * 2**30,
                "total_bytes": 12 * 2**30, "rate_bps": 100 * 2**20, "peers": 3}  # fmt: skip
    assert httpx.post(f"{coordinator_url}/swarm/progress", json=progress).status_code == 200

    report = drive("dashboard", coordinator_url, "dashboard.png", worker_id="w1", jobs_done=2)

    worker_id, state, backend, models, slots, queued, hardware, jobs, _ = report["row"]
    assert (worker_id, state, backend, models, slots, queued) == ("w1", "alive", "fake", "fake", "0 / 1", "0")
    assert "CPU" in hardware and "RAM" in hardware  # no GPU here: the CPU path of the telemetry
    assert jobs == "2 ok, 1 failed"
    assert report["states"] == [
        ["gone", "dead"],
        ["leader", "alive"],
        ["sick", "unhealthythe backend cannot generate: connection refused"],
        ["w1", "alive"],
    ]
    assert report["groups"] == ["split: leader 1 layer · 10.0.0.2:50052 30 layers (8.0 GiB)"]
    assert report["models"] == ["big1 (1)00", "fake1 (1)00", "other2 (0)00"]
    assert report["transfers"] == ["big10.0.0.9:6881 3.0 GiB / 12 GiB100 MiB/s392 s"]
    [failure] = report["failures"]
    assert "backend_error" in failure and "the fake backend was asked to fail" in failure
    assert report["connection"] == "live"
    assert report["charts"] == 4
    assert report["updated"] is True


def test_the_playground_streams_a_completion_token_by_token(
    coordinator_url: str, start_worker: StartWorker, drive: Callable[..., dict[str, Any]]
) -> None:
    start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.05"})
    prompt = "one two three four five six seven eight"

    report = drive("playground", coordinator_url, "playground.png", model="fake", prompt=prompt, max_tokens=32)

    assert report["models"] == ["fake"]
    assert report["status"] == "completed", report
    assert report["output"] == f"echo: {prompt}"
    assert report["token_events"] >= 3 and report["partials"] >= 3  # it arrived in pieces, not at the end
    assert "completed on w1: 9 tokens" in report["run_status"]
    stored = httpx.get(f"{coordinator_url}/result/{report['request_id']}").json()
    assert stored["output"] == report["output"]


@pytest.mark.model
def test_the_playground_streams_a_real_completion_of_the_packaged_model(
    coordinator_url: str, start_worker: StartWorker, drive: Callable[..., dict[str, Any]]
) -> None:
    start_worker("llama", backend="llamacpp", timeout_s=PROCESS_START_TIMEOUT_S * 2)

    report = drive(
        "playground", coordinator_url, "playground-gemma.png", model="gemma3:270m",
        prompt="The capital of France is", max_tokens=12, temperature=0, chat=False,
    )  # fmt: skip

    assert report["status"] == "completed", report
    assert report["output"].strip()
    assert report["token_events"] >= 2
    stored = httpx.get(f"{coordinator_url}/result/{report['request_id']}").json()
    assert stored["output"] == report["output"]
    assert stored["usage"]["completion_tokens"] > 0


def test_with_authentication_the_dashboard_asks_for_a_key_and_keeps_it(
    processes: Callable[..., Process], redis_url: str, drive: Callable[..., dict[str, Any]]
) -> None:
    async def keys() -> tuple[str, str]:
        redis = redis_client.async_client(redis_url)
        try:
            _, admin = await auth.create_key(redis, "dashboard test", "admin")
            _, join = await auth.create_key(redis, "dashboard test worker", "join")
        finally:
            await redis.aclose()
        return admin, join

    admin_key, join_key = asyncio.run(keys())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    coordinator = processes("coordinator", "--port", str(port), "--redis-url", redis_url, name="coordinator",
                            env={"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5"})  # fmt: skip
    worker = processes("worker", "--backend", "fake", "--coordinator", url, "--redis-url", redis_url,
                       "--worker-id", "w1", env={"GPUTORRENT_JOIN_TOKEN": join_key}, name="worker")  # fmt: skip

    def alive() -> bool:
        try:
            answer = httpx.get(f"{url}/workers", headers={"Authorization": f"Bearer {admin_key}"}, timeout=2)
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and [w["state"] for w in answer.json()] == ["alive"]

    wait_for(lambda: alive() or worker.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "the worker to join")
    assert worker.popen.poll() is None, worker.log
    assert httpx.get(f"{url}/pool").status_code == 401

    report = drive("dashboard", url, "dashboard-key.png", worker_id="w1", api_key=admin_key)

    assert "API key" in report["key_reason"]
    assert report["local_storage_key"] == admin_key
    assert report["row"][:3] == ["w1", "alive", "fake"]
    status = [sys.executable, "-m", "gputorrent", "status", "--url", url]
    refused = subprocess.run(
        status, capture_output=True, text=True, timeout=30, env={**os.environ, "GPUTORRENT_API_KEY": ""}
    )
    assert refused.returncode == 1 and "GPUTORRENT_API_KEY" in refused.stderr
    shown = subprocess.run(status, capture_output=True, text=True, timeout=30,
                           env={**os.environ, "GPUTORRENT_API_KEY": admin_key})  # fmt: skip
    assert shown.returncode == 0 and any(line.startswith("w1 ") for line in shown.stdout.splitlines()), shown.stderr
    assert admin_key not in coordinator.log and admin_key not in worker.log
    assert join_key not in coordinator.log and join_key not in worker.log
