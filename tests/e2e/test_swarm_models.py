"""Model files from peer to peer on real processes (gputorrent/worker/model_swarm.py): llama.cpp workers
on loopback, each with a models directory of its own, SmolLM2's GGUF as the model under a name made
for the test (the catalogue outlives a test: no test sees another's entries)."""

from __future__ import annotations

import json
import re
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gputorrent.client import APIClient
from gputorrent.swarm import file_sha256
from gputorrent.worker.backends.llamacpp import packaged_chat_model_path, packaged_model_path
from tests.conftest import Process, alive_workers, wait_for

pytest.importorskip("libtorrent", reason="libtorrent (the `swarm` extra) has no wheel for this machine")
pytestmark = pytest.mark.model

CHAT = [{"role": "user", "content": "Say hello."}]
GREEDY = {"max_tokens": 8, "temperature": 0}


def _holding(tmp_path: Path, name: str) -> dict[str, str]:
    """A models directory that holds the model `name` (SmolLM2's file, linked), as a worker's environment."""
    models = tmp_path / f"models-{uuid.uuid4().hex[:6]}"
    models.mkdir()
    (models / f"{name}.gguf").symlink_to(packaged_chat_model_path())
    return {"GPUTORRENT_MODELS_DIR": str(models)}


def _empty(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    models = tmp_path / f"models-{uuid.uuid4().hex[:6]}"
    return models, {"GPUTORRENT_MODELS_DIR": str(models)}


def _catalogue(url: str, name: str) -> dict[str, object]:
    entries = httpx.get(f"{url}/swarm/catalogue", timeout=10).json()
    return next(entry for entry in entries if entry["model"] == name)


def test_a_worker_fetches_its_model_from_a_holder_checks_it_and_serves_it(
    coordinator_url: str, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    name = f"swarm-{uuid.uuid4().hex[:8]}"
    holder = start_worker("holder", "--model", name, backend="llamacpp", env=_holding(tmp_path, name))
    published = _catalogue(coordinator_url, name)
    sha256 = file_sha256(packaged_chat_model_path())
    assert (published["sha256"], published["holders"]) == (sha256, ["holder"])

    models, env = _empty(tmp_path)
    newcomer = start_worker("newcomer", "--model", name, backend="llamacpp", env=env)
    copy = models / "by-sha256" / sha256 / f"{name}.gguf"
    assert file_sha256(copy) == sha256
    assert "MiB/s from 1 peers" in newcomer.log, newcomer.log  # the progress line
    assert sorted(_catalogue(coordinator_url, name)["holders"]) == ["holder", "newcomer"]  # type: ignore[type-var]

    holder.stop()  # only the newcomer's own copy can answer now
    wait_for(lambda: "holder" not in alive_workers(coordinator_url), 20, "the holder gone")
    with APIClient(coordinator_url) as client:
        result = client.infer(name, messages=CHAT, options=GREEDY, timeout_s=120)
    assert (result.worker_id, result.status) == ("newcomer", "completed") and result.output


def test_a_model_outside_the_catalogue_stops_the_worker_with_a_clear_error(
    coordinator_url: str, processes: Callable[..., Process], redis_url: str, tmp_path: Path
) -> None:
    _, env = _empty(tmp_path)
    name = f"swarm-{uuid.uuid4().hex[:8]}"
    worker = processes(
        "worker", "--backend", "llamacpp", "--coordinator", coordinator_url, "--redis-url", redis_url,
        "--model", name, env=env, name="worker",
    )  # fmt: skip
    assert worker.popen.wait(timeout=60) != 0
    assert f"model {name!r} is neither here nor in the pool's catalogue" in worker.log, worker.log


def test_a_pull_puts_a_catalogued_model_on_a_running_llamacpp_worker_from_its_peers(
    coordinator_url: str, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    """`POST /api/pull` reaches a llama.cpp worker: it fetches the file, loads it beside its model,
    and serves it without a restart; the progress streams per worker."""
    name = f"swarm-{uuid.uuid4().hex[:8]}"
    start_worker("holder", "--model", name, backend="llamacpp", env=_holding(tmp_path, name))
    other = f"other-{uuid.uuid4().hex[:8]}"
    models, env = _empty(tmp_path)
    (models).mkdir()
    (models / f"{other}.gguf").symlink_to(packaged_chat_model_path())
    start_worker("puller", "--model", other, backend="llamacpp", env=env)

    with httpx.stream("POST", f"{coordinator_url}/api/pull", json={"model": name}, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert lines[-1]["status"] == "success", lines
    fetching = [line for line in lines if "MiB/s from" in line.get("status", "")]
    assert fetching and all(line.get("worker") == "puller" for line in fetching), lines
    assert fetching[-1]["total"] == _catalogue(coordinator_url, name)["size"]

    with APIClient(coordinator_url) as client:
        served = {w.worker_id: w.models for w in client.workers() if w.state == "alive"}
        assert served["puller"] == [other, name]
        result = client.infer(other, messages=CHAT, options=GREEDY, timeout_s=120)  # its first model still answers
        assert result.worker_id == "puller"
    assert sorted(_catalogue(coordinator_url, name)["holders"]) == ["holder", "puller"]  # type: ignore[type-var]


def _transfers(url: str, name: str) -> list[bool]:
    """Whether each fetch of `name` under way is paused, as `/pool` (the dashboard) shows them."""
    return [t["paused"] for t in httpx.get(f"{url}/pool", timeout=10).json()["transfers"] if t["model"] == name]


def _fetched_mib(log: str) -> list[float]:
    return [float(done) for done in re.findall(r": ([\d.]+) of [\d.]+ MiB, ", log)]


def test_the_last_holder_leaving_pauses_a_fetch_which_resumes_where_it_stopped_when_a_holder_is_back(
    coordinator_url: str, start_worker: Callable[..., Process], processes: Callable[..., Process],
    redis_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    name = f"swarm-{uuid.uuid4().hex[:8]}"
    holding = _holding(tmp_path, name)
    slow = {**holding, "GPUTORRENT_SWARM_UPLOAD_LIMIT_BPS": str(2 * 1024 * 1024)}  # about 50 s for the file
    holder = start_worker("holder", "--model", name, backend="llamacpp", env=slow)
    _, env = _empty(tmp_path)
    newcomer = processes(
        "worker", "--backend", "llamacpp", "--coordinator", coordinator_url, "--redis-url", redis_url,
        "--worker-id", "newcomer", "--model", name, env={**env, "GPUTORRENT_SWARM_STALL_TIMEOUT_S": "2"},
        name="newcomer",
    )  # fmt: skip
    wait_for(lambda: max(_fetched_mib(newcomer.log), default=0) >= 8, 60, "8 MiB fetched")
    holder.stop()
    wait_for(lambda: "paused: no holder of" in newcomer.log, 30, "the fetch paused")
    wait_for(lambda: _transfers(coordinator_url, name) == [True], 10, "the dashboard's view: one transfer, paused")
    before = max(_fetched_mib(newcomer.log))
    paused_at = len(newcomer.log)

    start_worker("holder", "--model", name, backend="llamacpp", env=holding)  # back, and unlimited
    wait_for(lambda: "newcomer" in alive_workers(coordinator_url) or newcomer.popen.poll() is not None, 120,
             "the newcomer alive")  # fmt: skip
    assert newcomer.popen.poll() is None, newcomer.log
    resumed = _fetched_mib(newcomer.log[paused_at:])
    assert resumed and resumed[0] >= before - 4, (before, resumed)  # at most a piece in flight was lost
    sha256 = _catalogue(coordinator_url, name)["sha256"]
    assert file_sha256(Path(env["GPUTORRENT_MODELS_DIR"]) / "by-sha256" / str(sha256) / f"{name}.gguf") == sha256


def test_another_file_under_a_published_name_stops_the_worker_at_once_naming_the_conflict(
    coordinator_url: str, start_worker: Callable[..., Process], processes: Callable[..., Process],
    redis_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    name = f"swarm-{uuid.uuid4().hex[:8]}"
    start_worker("holder", "--model", name, backend="llamacpp", env=_holding(tmp_path, name))
    models, env = _empty(tmp_path)
    models.mkdir()
    (models / f"{name}.gguf").symlink_to(packaged_model_path())  # another model's file under that name
    other = processes(
        "worker", "--backend", "llamacpp", "--coordinator", coordinator_url, "--redis-url", redis_url,
        "--worker-id", "other", "--model", name, env=env, name="other",
    )  # fmt: skip
    assert other.popen.wait(timeout=60) != 0  # at once, not after the registration timeout's retries
    assert f"the pool's catalogue has another file as {name!r}" in other.log, other.log


def test_a_worker_told_to_stop_while_it_fetches_its_model_stops_and_never_joins(
    coordinator_url: str, start_worker: Callable[..., Process], processes: Callable[..., Process],
    redis_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    name = f"swarm-{uuid.uuid4().hex[:8]}"
    slow = {**_holding(tmp_path, name), "GPUTORRENT_SWARM_UPLOAD_LIMIT_BPS": str(1024 * 1024)}  # about 90 s
    start_worker("holder", "--model", name, backend="llamacpp", env=slow)
    _, env = _empty(tmp_path)
    newcomer = processes(
        "worker", "--backend", "llamacpp", "--coordinator", coordinator_url, "--redis-url", redis_url,
        "--worker-id", "newcomer", "--model", name, env=env, name="newcomer",
    )  # fmt: skip
    wait_for(lambda: max(_fetched_mib(newcomer.log), default=0) > 0, 60, "the fetch under way")
    newcomer.signal(signal.SIGTERM)
    assert newcomer.popen.wait(timeout=15) == 0, newcomer.log
    assert "stopped while fetching the model; never joined the pool" in newcomer.log
    assert "newcomer" not in alive_workers(coordinator_url)
    wait_for(lambda: _transfers(coordinator_url, name) == [], 10, "its transfer gone from the dashboard")
