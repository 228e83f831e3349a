"""B10, a model split over machines: a group (a leader and two shard hosts, llama.cpp's RPC backend)
against llama-server alone on the leader, both built from the same llama.cpp.

Each part runs on a host of its own (network namespaces joined by a bridge, as tests/netns.py makes
them), so the bytes each shard host receives are its link's own count (the bridge side of its veth).
Measured in one run:

- generation speed: tokens a second of the same greedy completions, alone and split;
- the first load of the model onto the shard hosts (their tensor caches empty), and a second load
  after the leader restarts (ggml-rpc-server's cache, `-c`, holds the tensors): time from the
  leader's start to its first answer, and bytes sent to the shard hosts;
- re-forming: a shard host killed (its ggml-rpc-server too) while the group is idle and a spare
  waits, the time until the leader's log says the group re-formed, and until it answers again.

    .venv/bin/python bench/split.py

Prints a Markdown table and writes bench/results/split.json (bench/report.py makes the plot). Runs as
root (namespaces), with the tools built (`python -m gputorrent.llama_tools`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from pool import save_plot, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import Process, new_key  # noqa: E402
from tests.faults.netns_pool import COORDINATOR_PORT, HostRedis  # noqa: E402
from tests.netns import Network  # noqa: E402

MODEL = "gemma3:270m"
PROMPT = "The history of the Roman Empire is long and complicated. It was founded"
TOKENS = 64
RUNS = 3
RPC_PORT = 50052


def _veth_tx(veth: str) -> int:
    """Bytes the bridge side of a host's veth sent into the host: what that host received."""
    return int(Path(f"/sys/class/net/{veth}/statistics/tx_bytes").read_text())


class Bench:
    def __init__(self, network: Network, workdir: Path) -> None:
        self.network, self.workdir = network, workdir
        self.hosts = {name: network.add(name) for name in ("redis", "c1", "leader", "s1", "s2", "s3")}
        self.redis = HostRedis(self.hosts["redis"]).start()
        self.admin, self.join = new_key(self.redis.url, "admin"), new_key(self.redis.url, "join")
        self.url = f"http://{self.hosts['c1'].address}:{COORDINATOR_PORT}"
        self.http = httpx.Client(timeout=300, headers={"Authorization": f"Bearer {self.admin}"})
        self.procs: list[Process] = []

    def start(self, host: str, args: list[str], env: dict[str, str] | None = None, name: str = "") -> Process:
        proc = Process(args, self.workdir / f"{name or host}-{len(self.procs)}.log",
                       {"GPUTORRENT_JOIN_TOKEN": self.join, **(env or {})}, prefix=self.hosts[host].prefix)  # fmt: skip
        self.procs.append(proc)
        return proc

    def wait(self, condition: Any, what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what}: " + " | ".join(p.log[-300:] for p in self.procs[-3:]))

    def alive(self) -> set[str]:
        return {w["worker_id"] for w in self.http.get(f"{self.url}/workers").json() if w["state"] == "alive"}

    def generate(self) -> tuple[float, str]:
        """Tokens a second of one greedy completion (the worker's own inference time), and its text."""
        body = {"model": MODEL, "prompt": PROMPT, "options": {"max_tokens": TOKENS, "temperature": 0}}
        accepted = self.http.post(f"{self.url}/inference", json=body).json()
        result = self.http.get(f"{self.url}/result/{accepted['request_id']}", params={"wait": 120}).json()
        assert result["status"] == "completed", result
        return result["usage"]["completion_tokens"] / (result["timings"]["inference_ms"] / 1000), result["output"]

    def leader(self, split: str) -> Process:
        return self.start("leader", ["worker", "--backend", "llamacpp", "--coordinator", self.url, "--redis-url",
                                     self.redis.url, "--worker-id", "leader", "--model", MODEL, "--split", split],
                          name=f"leader-split{split}")  # fmt: skip

    def shard(self, name: str) -> Process:
        args = ["shard", "--listen", f"{self.hosts[name].address}:{RPC_PORT}", "--coordinator", self.url,
                "--shard-id", name]  # fmt: skip
        return self.start(name, args, {"LLAMA_CACHE": str(self.workdir / f"{name}-cache")})

    def stop(self, proc: Process) -> None:
        proc.stop()
        self.wait(lambda: "leader" not in self.alive(), "the leader gone", 60)


def run() -> dict[str, Any]:
    network = Network()
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(network, Path(work))
        try:
            return _measure(bench)
        finally:
            for proc in reversed(bench.procs):
                proc.stop()
            bench.redis.stop()
            network.close()


def _measure(bench: Bench) -> dict[str, Any]:
    bench.start("c1", ["coordinator", "--host", bench.hosts["c1"].address, "--port", str(COORDINATOR_PORT),
                       "--redis-url", bench.redis.url])  # fmt: skip
    bench.wait(lambda: bench.http.get(f"{bench.url}/health").status_code == 200, "the coordinator")
    alone = bench.leader("0")
    bench.wait(lambda: "leader" in bench.alive(), "llama-server alone")
    speeds: dict[str, list[float]] = {"alone": [], "split": []}
    # Each side's first answer after its start: a later one may reuse llama-server's cached prompt,
    # which evaluates positions in other batches (other numbers; docs/reliability.md).
    texts: dict[str, str] = {}
    for _ in range(RUNS):
        speed, text = bench.generate()
        texts.setdefault("alone", text)
        speeds["alone"].append(speed)
    bench.stop(alone)

    # Two shard hosts for both loads, so the second finds its tensors in the same caches; the spare later.
    shards = {name: bench.shard(name) for name in ("s1", "s2")}
    bench.wait(lambda: sum(s["alive"] for s in bench.http.get(f"{bench.url}/shards").json()) == 2, "shard hosts")
    loads: dict[str, dict[str, float]] = {}
    for load in ("first", "second"):  # the second finds the tensors in the shard hosts' caches
        before = {name: _veth_tx(bench.hosts[name].veth) for name in shards}
        started = time.monotonic()
        leader = bench.leader("2")
        bench.wait(lambda: "leader" in bench.alive(), f"the group's {load} load")
        speed, text = bench.generate()
        texts.setdefault("split", text)
        held = [s["shard_id"] for s in bench.http.get(f"{bench.url}/shards").json() if s["group"] == "leader"]
        sent = sum(_veth_tx(bench.hosts[name].veth) - before[name] for name in shards)
        loads[load] = {"seconds": time.monotonic() - started, "mib_sent": sent / 2**20, "hosts": len(held)}
        speeds["split"].append(speed)
        if load == "first":
            bench.stop(leader)
    for _ in range(RUNS - 1):
        speeds["split"].append(bench.generate()[0])

    shards["s3"] = bench.shard("s3")
    bench.wait(lambda: sum(s["alive"] for s in bench.http.get(f"{bench.url}/shards").json()) == 3, "the spare")
    victim = held[0]
    killed_at = time.monotonic()
    for child in psutil.Process(shards[victim].popen.pid).children(recursive=True):
        child.kill()
    shards[victim].popen.send_signal(signal.SIGKILL)
    bench.wait(lambda: "re-formed in" in leader.log, "the group re-formed")
    reformed_s = time.monotonic() - killed_at
    bench.wait(lambda: "leader" in bench.alive(), "the leader serving again")
    bench.generate()
    answering_s = time.monotonic() - killed_at
    return {
        "model": MODEL, "tokens": TOKENS, "speeds": speeds, "loads": loads,
        "same_text": texts["alone"] == texts["split"], "reformed_s": reformed_s, "answering_s": answering_s,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    alone, split = median(result["speeds"]["alone"]), median(result["speeds"]["split"])
    first, second = result["loads"]["first"], result["loads"]["second"]
    rows = [
        "| | llama-server alone | split over 2 shard hosts | split / alone |",
        "|---|---:|---:|---:|",
        f"| tokens/s (median) | {alone:.1f} | {split:.1f} | {split / alone:.2f} |",
        "",
        "| load of the split model | seconds to the first answer | MiB sent to the shard hosts |",
        "|---|---:|---:|",
        f"| first (shard caches empty) | {first['seconds']:.1f} | {first['mib_sent']:.1f} |",
        f"| second (from their caches) | {second['seconds']:.1f} | {second['mib_sent']:.1f} |",
        "",
        f"A shard host killed: the group re-formed on the remaining host and a spare in {result['reformed_s']:.1f} s, "
        f"and answered again {result['answering_s']:.1f} s after the kill. Greedy text of the group "
        f"{'equals' if result['same_text'] else 'DIFFERS from'} llama-server's alone. {result['model']}, "
        f"{result['tokens']} tokens a completion; every part on a network namespace of its own.",
    ]
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (speed, load) = plt.subplots(1, 2, figsize=(8, 3.2))
    speeds = result["speeds"]
    speed.bar(["alone", "split over 2"], [sorted(speeds[k])[len(speeds[k]) // 2] for k in ("alone", "split")])
    speed.set_ylabel("tokens / s")
    speed.set_title("generation")
    loads = result["loads"]
    load.bar(["first load", "second load"], [loads["first"]["mib_sent"], loads["second"]["mib_sent"]])
    load.set_ylabel("MiB sent to shard hosts")
    load.set_title(f"loading (re-form: {result['reformed_s']:.1f} s)")
    fig.suptitle(f"B10 {result['model']} split with llama.cpp RPC")
    save_plot(fig, out)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    result = run()
    print(table(result))
    print(f"written to {write_result('split', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
