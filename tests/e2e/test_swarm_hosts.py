"""The swarm across hosts (tests/netns.py): Redis, the coordinator, one worker that holds the model
and four new workers each on a host of its own. The four get the model, verified, from the holder and
from each other, and each serves a request from its own copy."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from gputorrent.client import APIClient
from gputorrent.swarm import file_sha256
from gputorrent.worker.backends.llamacpp import packaged_chat_model_path
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, healthy, new_key, wait_for
from tests.faults.netns_pool import COORDINATOR_PORT, HostRedis
from tests.netns import Host

pytest.importorskip("libtorrent", reason="libtorrent (the `swarm` extra) has no wheel for this machine")
pytestmark = pytest.mark.model

NEWCOMERS = ("n1", "n2", "n3", "n4")
# Run on a host that never registered: it knows the torrent and the holder's address, and still gets nothing.
OUTSIDER_FETCH = """
import sys, tempfile
from pathlib import Path
from gputorrent.swarm import NoSeeder, Swarm, describe
address, holder, port, model = sys.argv[1:]
swarm = Swarm(address)
try:
    swarm.fetch(describe(Path(model)), Path(tempfile.mkdtemp()), [(holder, int(port))], stall_timeout_s=5)
except NoSeeder as e:
    print("refused:", e)
else:
    print("fetched")
"""
# The holder's upload, capped (libtorrent's own limit: the kernel here has no netem to shape the link),
# so the four fetch long enough to trade pieces among themselves.
HOLDER_UPLOAD_BPS = 8 * 1024 * 1024


def test_four_new_hosts_get_the_model_from_the_holder_and_each_other_and_serve_it(
    netns_hosts: Callable[..., dict[str, Host]], tmp_path: Path
) -> None:
    hosts = netns_hosts("redis", "c1", "holder", *NEWCOMERS, "outsider")
    redis = HostRedis(hosts["redis"]).start()
    processes: list[Process] = []
    try:
        admin, join = new_key(redis.url, "admin"), new_key(redis.url, "join")

        def start(host: str, args: list[str], env: dict[str, str]) -> Process:
            proc = Process(args, tmp_path / f"{host}.log", env, prefix=hosts[host].prefix)
            processes.append(proc)
            return proc

        url = f"http://{hosts['c1'].address}:{COORDINATOR_PORT}"
        start("c1", ["coordinator", "--host", hosts["c1"].address, "--port", str(COORDINATOR_PORT),
                     "--redis-url", redis.url], {"GPUTORRENT_ROUTING": "round_robin"})  # fmt: skip
        client = APIClient(url, api_key=admin)
        wait_for(lambda: healthy(url), PROCESS_START_TIMEOUT_S, "the coordinator")

        name = f"swarm-{uuid.uuid4().hex[:8]}"
        held = tmp_path / "holder-models"
        held.mkdir()
        (held / f"{name}.gguf").symlink_to(packaged_chat_model_path())

        def worker(host: str, models: Path, **env: str) -> Process:
            args = ["worker", "--backend", "llamacpp", "--coordinator", url, "--redis-url", redis.url,
                    "--worker-id", host, "--model", name]  # fmt: skip
            return start(host, args, {"GPUTORRENT_JOIN_TOKEN": join, "GPUTORRENT_MODELS_DIR": str(models), **env})

        holder = worker("holder", held, GPUTORRENT_SWARM_UPLOAD_LIMIT_BPS=str(HOLDER_UPLOAD_BPS))
        _wait_alive(client, {"holder": holder})
        newcomers = {host: worker(host, tmp_path / f"{host}-models") for host in NEWCOMERS}
        _wait_alive(client, newcomers, timeout_s=180)

        sha256 = file_sha256(packaged_chat_model_path())
        for host in newcomers:
            assert file_sha256(tmp_path / f"{host}-models" / "by-sha256" / sha256 / f"{name}.gguf") == sha256
        # Pieces came from other newcomers too: some progress line counts more peers than the one holder.
        most_peers = max(int(n) for proc in newcomers.values() for n in re.findall(r"from (\d+) peers", proc.log))
        assert most_peers >= 2, [proc.log for proc in newcomers.values()]

        holder_swarm = next(w.swarm for w in client.workers() if w.worker_id == "holder")
        assert holder_swarm is not None and holder_swarm.address == hosts["holder"].address
        outsider = hosts["outsider"].popen(
            [sys.executable, "-c", OUTSIDER_FETCH, hosts["outsider"].address, holder_swarm.address,
             str(holder_swarm.port), str(held / f"{name}.gguf")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = outsider.communicate(timeout=60)
        # Same bridge as the newcomers, which fetched: only the holder's filter (members only) stops it.
        assert out.startswith("refused: "), out

        holder.stop()  # only the newcomers' own copies can answer now
        wait_for(lambda: _alive(client) == set(NEWCOMERS), 30, "the holder gone")
        served_by = {
            client.infer(name, messages=[{"role": "user", "content": f"Say {i}."}], options={"max_tokens": 4},
                         timeout_s=120).worker_id
            for i in range(len(NEWCOMERS))
        }  # fmt: skip
        assert served_by == set(NEWCOMERS)  # round robin: one request each
        client.close()
    finally:
        for proc in reversed(processes):
            proc.stop()
        redis.stop()


def _alive(client: APIClient) -> set[str]:
    return {w.worker_id for w in client.workers() if w.state == "alive"}


def _wait_alive(client: APIClient, workers: dict[str, Process], timeout_s: float = PROCESS_START_TIMEOUT_S) -> None:
    wait_for(
        lambda: set(workers) <= _alive(client) or any(p.popen.poll() is not None for p in workers.values()),
        timeout_s, f"workers {sorted(workers)} alive",
    )  # fmt: skip
    for host, proc in workers.items():
        assert proc.popen.poll() is None, f"{host}: {proc.log}"
