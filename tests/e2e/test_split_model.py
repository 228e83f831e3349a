"""A model split over machines (gputorrent/shard.py, worker/backends/split.py) on real processes: shard
hosts running llama.cpp's ggml-rpc-server, leaders running llama-server with `--rpc`, both built by
`python -m gputorrent.llama_tools` from the same llama.cpp. SmolLM2's GGUF is the model, under names
made for each test in models directories of its own."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from gputorrent import llama_tools
from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.worker.backends.llamacpp import packaged_chat_model_path
from tests.conftest import Process, StreamReader, alive_workers, wait_for

pytestmark = pytest.mark.model

PROMPTS = ["Name three colours.", "What is the capital of France?", "Count from one to five.", "Say hello."]


def _tools_built() -> None:
    try:
        llama_tools.tool(llama_tools.RPC_SERVER)
        llama_tools.tool(llama_tools.LLAMA_SERVER)
    except llama_tools.ToolsMissing as e:
        pytest.fail(f"{e} (`make test` builds them)")


def _models(tmp_path: Path, *names: str) -> dict[str, str]:
    """A models directory holding SmolLM2's file under each name, as a worker's environment."""
    models = tmp_path / f"models-{uuid.uuid4().hex[:6]}"
    models.mkdir()
    for name in names:
        (models / f"{name}.gguf").symlink_to(packaged_chat_model_path())
    return {"GPUTORRENT_MODELS_DIR": str(models)}


def _shards(processes: Callable[..., Process], coordinator_url: str, count: int, **env: str) -> list[Process]:
    started = []
    for i in range(count):
        proc = processes("shard", "--listen", f"127.0.0.1:{free_port()}", "--coordinator", coordinator_url,
                         "--shard-id", f"s{i}", env=env, name=f"shard-{i}")  # fmt: skip
        started.append(proc)
    wait_for(lambda: sum(s["alive"] for s in _listed(coordinator_url)) == count
             or any(p.popen.poll() is not None for p in started), 60, f"{count} shard hosts")  # fmt: skip
    for proc in started:
        assert proc.popen.poll() is None, proc.log
    return started


def _listed(url: str) -> list[dict[str, object]]:
    reply = httpx.get(f"{url}/shards", timeout=10)
    return reply.json() if reply.status_code == 200 else []


def _answers(url: str, model: str) -> list[str]:
    with APIClient(url) as client:
        return [
            client.infer(model, messages=[{"role": "user", "content": p}], options={"max_tokens": 24, "temperature": 0},
                         timeout_s=120).output
            for p in PROMPTS
        ]  # fmt: skip


def test_a_shard_host_will_not_listen_on_every_interface_or_a_public_address_by_default(
    processes: Callable[..., Process], coordinator_url: str
) -> None:
    for listen, why in (("0.0.0.0:50052", "is every interface"), ("8.8.8.8:50052", "is a public address")):
        shard = processes("shard", "--listen", listen, "--coordinator", coordinator_url, name="shard")
        assert shard.popen.wait(timeout=30) == 2
        assert why in shard.log and "--allow-public" in shard.log, shard.log
    assert _listed(coordinator_url) == []


def test_a_group_answers_as_llama_server_alone_and_lists_its_hosts_and_layers(
    coordinator_url: str, start_worker: Callable[..., Process], processes: Callable[..., Process], tmp_path: Path
) -> None:
    _tools_built()
    _shards(processes, coordinator_url, 2)
    env = _models(tmp_path, "alone", "split")
    start_worker("alone", "--model", "alone", "--split", "0", backend="llamacpp", env=env, timeout_s=120)
    start_worker("leader", "--model", "split", "--split", "2", backend="llamacpp", env=env, timeout_s=180)

    assert _answers(coordinator_url, "split") == _answers(coordinator_url, "alone")  # greedy: token for token
    with APIClient(coordinator_url) as client:
        leader = next(w for w in client.workers() if w.worker_id == "leader")
    assert leader.group is not None
    _on_leader, *hosts = leader.group.hosts
    assert sorted(h.shard_id for h in hosts) == ["s0", "s1"]  # type: ignore[type-var]
    assert sum(h.layers for h in leader.group.hosts) == 31 and all(h.layers > 0 for h in hosts)  # 30 + output
    assert {s["group"] for s in _listed(coordinator_url)} == {"leader"}
    [split] = [m for m in httpx.get(f"{coordinator_url}/api/ps", timeout=10).json()["models"] if m["name"] == "split"]
    assert [h["shard_id"] for h in split["groups"]["leader"]] == [None, *(h.shard_id for h in hosts)]


def test_auto_refuses_a_model_bigger_than_the_pool_naming_what_is_missing(
    coordinator_url: str, processes: Callable[..., Process], redis_url: str, tmp_path: Path
) -> None:
    _tools_built()
    _shards(processes, coordinator_url, 2, GPUTORRENT_SHARD_MEMORY_BYTES=str(10 * 2**20))  # 10 MiB each
    env = {**_models(tmp_path, "big"), "GPUTORRENT_SPLIT_MEMORY_BYTES": str(2**20)}
    leader = processes(
        "worker", "--backend", "llamacpp", "--coordinator", coordinator_url, "--redis-url", redis_url,
        "--worker-id", "leader", "--model", "big", "--split", "auto", env=env, name="leader",
    )  # fmt: skip
    assert leader.popen.wait(timeout=60) == 1
    assert "cannot split big" in leader.log and "are missing" in leader.log, leader.log
    assert "2 free shard hosts" in leader.log
    assert "leader" not in alive_workers(coordinator_url)


def test_a_shard_host_killed_mid_stream_the_stream_completes_and_the_group_re_forms(
    coordinator_url: str, start_worker: Callable[..., Process], processes: Callable[..., Process], tmp_path: Path
) -> None:
    _tools_built()
    shards = _shards(processes, coordinator_url, 3)
    env = _models(tmp_path, "m")
    start_worker("leader", "--model", "m", "--split", "2", backend="llamacpp", env=env, timeout_s=180)
    start_worker("spare", "--model", "m", "--split", "0", backend="llamacpp", env=env, timeout_s=120)
    body = {"model": "m", "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            "stream": True, "options": {"max_tokens": 200, "temperature": 0}}  # fmt: skip
    for _ in range(4):  # round robin: one of the first two streams runs on the leader
        reader = StreamReader(coordinator_url, body)
        reader.start()
        wait_for(lambda: bool(reader.events), 30, "the queued event")  # noqa: B023
        if reader.events[0][1]["worker_id"] == "leader":
            break
        reader.join(timeout=120)
    else:
        pytest.fail("no stream ran on the leader")
    wait_for(lambda: reader.tokens() >= 10, 60, "ten tokens from the group")
    held = sorted(str(s["shard_id"]) for s in _listed(coordinator_url) if s["group"] == "leader")
    victim_id = held[0]
    victim = shards[int(victim_id.removeprefix("s"))]
    for child in psutil.Process(victim.popen.pid).children(recursive=True):  # its ggml-rpc-server
        child.kill()
    victim.popen.send_signal(signal.SIGKILL)

    reader.join(timeout=180)
    assert not reader.is_alive(), "the stream never ended"
    result = reader.result()
    assert result["status"] == "completed" and result["worker_id"] == "spare", result
    assert reader.text() == result["output"]  # the client's stream: nothing lost, nothing repeated

    wait_for(lambda: "re-formed in" in _log(tmp_path, "worker-leader"), 120, "the group re-formed")
    wait_for(lambda: "leader" in alive_workers(coordinator_url), 60, "the leader serving again")
    regrouped = {s["shard_id"] for s in _listed(coordinator_url) if s["group"] == "leader"}
    assert len(regrouped) == 2 and victim_id not in regrouped


def _log(tmp_path: Path, name: str) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(tmp_path.glob(f"{name}-*.log")))
