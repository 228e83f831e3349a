"""A model split over hosts (tests/netns.py): Redis, the coordinator, a leader and shard hosts each on a
network stack of its own, joined by a bridge. At temperature 0 the group's answers are llama-server's
alone, token for token (the same llama.cpp build on every host); and when a shard host's link is cut,
the group re-forms on the other and a spare, and answers the same again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gputorrent import llama_tools
from gputorrent.client import APIClient
from gputorrent.worker.backends.llamacpp import packaged_chat_model_path
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, healthy, new_key, wait_for
from tests.faults.netns_pool import COORDINATOR_PORT, HostRedis
from tests.netns import Host

pytestmark = pytest.mark.model

PROMPTS = ["Name three colours.", "What is the capital of France?", "Count from one to five.", "Say hello."]
RPC_PORT = 50052


def test_a_leader_and_two_shard_hosts_on_their_own_hosts_answer_as_llama_server_alone(
    netns_hosts: Callable[..., dict[str, Host]], tmp_path: Path
) -> None:
    try:
        llama_tools.tool(llama_tools.RPC_SERVER), llama_tools.tool(llama_tools.LLAMA_SERVER)
    except llama_tools.ToolsMissing as e:
        pytest.fail(f"{e} (`make test` builds them)")
    hosts = netns_hosts("redis", "c1", "leader", "s1", "s2", "s3")
    redis = HostRedis(hosts["redis"]).start()
    processes: list[Process] = []
    try:
        admin, join = new_key(redis.url, "admin"), new_key(redis.url, "join")

        def start(host: str, args: list[str], env: dict[str, str] | None = None) -> Process:
            proc = Process(args, tmp_path / f"{host}-{len(processes)}.log", env, prefix=hosts[host].prefix)
            processes.append(proc)
            return proc

        url = f"http://{hosts['c1'].address}:{COORDINATOR_PORT}"
        start("c1", ["coordinator", "--host", hosts["c1"].address, "--port", str(COORDINATOR_PORT),
                     "--redis-url", redis.url])  # fmt: skip
        client = APIClient(url, api_key=admin)
        wait_for(lambda: healthy(url), PROCESS_START_TIMEOUT_S, "the coordinator")
        for name in ("s1", "s2"):  # s3 joins later: the spare the group re-forms with
            start(name, ["shard", "--listen", f"{hosts[name].address}:{RPC_PORT}", "--coordinator", url,
                         "--shard-id", name], {"GPUTORRENT_JOIN_TOKEN": join})  # fmt: skip
        as_admin = {"Authorization": f"Bearer {admin}"}
        wait_for(lambda: sum(s["alive"] for s in httpx.get(f"{url}/shards", headers=as_admin).json()) == 2, 60,
                 "the shard hosts")  # fmt: skip

        models = tmp_path / "leader-models"
        models.mkdir()
        for name in ("alone", "split"):
            (models / f"{name}.gguf").symlink_to(packaged_chat_model_path())
        env = {"GPUTORRENT_JOIN_TOKEN": join, "GPUTORRENT_MODELS_DIR": str(models)}
        leaders = {
            worker_id: start("leader", ["worker", "--backend", "llamacpp", "--coordinator", url, "--redis-url",
                                        redis.url, "--worker-id", worker_id, "--model", worker_id, "--split", split],
                             env)
            for worker_id, split in (("alone", "0"), ("split", "2"))
        }  # fmt: skip
        wait_for(lambda: {"alone", "split"} <= {w.worker_id for w in client.workers() if w.state == "alive"}
                 or any(p.popen.poll() is not None for p in processes), 240, "both workers")  # fmt: skip
        assert all(p.popen.poll() is None for p in processes), [p.log for p in processes]

        group = next(w.group for w in client.workers() if w.worker_id == "split")
        assert group is not None
        assert {h.address for h in group.hosts[1:]} == {hosts["s1"].address, hosts["s2"].address}

        def answers(model: str) -> list[str]:
            return [
                client.infer(model, messages=[{"role": "user", "content": p}],
                             options={"max_tokens": 24, "temperature": 0}, timeout_s=120).output
                for p in PROMPTS
            ]  # fmt: skip

        alone = answers("alone")
        assert answers("split") == alone

        start("s3", ["shard", "--listen", f"{hosts['s3'].address}:{RPC_PORT}", "--coordinator", url,
                     "--shard-id", "s3"], {"GPUTORRENT_JOIN_TOKEN": join})  # fmt: skip
        wait_for(lambda: sum(s["alive"] for s in httpx.get(f"{url}/shards", headers=as_admin).json()) == 3, 60,
                 "the spare shard host")  # fmt: skip
        assert "re-forming" not in leaders["split"].log  # a healthy group stays as it formed
        hosts["s1"].cut()  # llama-server hangs on a cut link; the leader sees s1's lease lapse
        wait_for(lambda: _group_addresses(client) == {hosts["s2"].address, hosts["s3"].address}, 60,
                 "the group re-formed on s2 and s3")  # fmt: skip
        wait_for(lambda: "split" in {w.worker_id for w in client.workers() if w.state == "alive"}, 60,
                 "the leader serving again")  # fmt: skip
        assert answers("split") == alone
        client.close()
    finally:
        for proc in reversed(processes):
            proc.stop()
        redis.stop()


def _group_addresses(client: APIClient) -> set[str]:
    group = next(w.group for w in client.workers() if w.worker_id == "split")
    return {h.address for h in group.hosts[1:]} if group is not None else set()
