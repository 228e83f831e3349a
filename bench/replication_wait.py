"""B8, what waiting for a replica costs: admission latency with `WAIT` off and on, one replica.

One run starts a Redis primary and one replica (`redis-server`, or the packaged Valkey, with
`--replicaof`), two coordinators on that primary (authentication on), one with
`GPUTORRENT_WAIT_REPLICAS=0` and one with the default `auto` (which waits for the replica, since
the primary has one online), and one `fake`-backend worker. It then submits the same prompt to the
two in turn, request by request, one at a time on a kept-alive connection each, so both sides see
the same machine noise, and times each `POST /inference` to its 202. The difference is what the
replica's acknowledgement adds to an admission.

    bench/.venv/bin/python bench/replication_wait.py --requests 1000

Prints a Markdown table and writes bench/results/replication_wait.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pool import Pool, Processes, save_plot, start_pool, summary, wait_until, write_result
from redis import Redis

from gputorrent.embedded import free_port, server_binary

SIDES = (("off", "0"), ("on", "auto"))  # side name, GPUTORRENT_WAIT_REPLICAS


def start_primary_and_replica(procs: Processes, workdir: Path) -> str:
    """A primary and one replica on free ports, the replica online; the primary's URL."""
    binary = server_binary()
    ports = free_port(), free_port()
    for i, port in enumerate(ports):
        (workdir / str(i)).mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir / str(i)), "--maxmemory-policy", "noeviction",
                "--loglevel", "warning"]  # fmt: skip
        if i:
            args += ["--replicaof", "127.0.0.1", str(ports[0])]
        procs.start(args)
    primary = Redis(port=ports[0], decode_responses=True)

    def replica_online() -> bool:
        try:
            replica = primary.info("replication").get("slave0")  # redis-py parses it into a dict
            return isinstance(replica, dict) and replica.get("state") == "online"
        except OSError:
            return False

    try:
        wait_until(replica_online, "the replica to come online", timeout_s=30)
    finally:
        primary.close()
    return f"redis://127.0.0.1:{ports[0]}"


def run(requests: int) -> dict[str, Any]:
    body = {"model": "fake", "prompt": "one two three", "options": {"max_tokens": 3}}
    with tempfile.TemporaryDirectory() as workdir, Processes() as procs:
        redis_url = start_primary_and_replica(procs, Path(workdir))
        pools: dict[str, Pool] = {
            side: start_pool(procs, redis_url, {"GPUTORRENT_WAIT_REPLICAS": value}) for side, value in SIDES
        }
        first = pools["off"]
        first.add_worker(["--backend", "fake", "--model", "fake", "--slots", "8"])
        first.wait_for_workers(1)
        clients = {
            side: httpx.Client(base_url=pool.url, headers=pool.headers, timeout=30) for side, pool in pools.items()
        }
        latency_ms: dict[str, list[float]] = {side: [] for side in pools}
        try:
            for i in range(requests + 20):  # the first 20 a side warm up connections and caches
                for side, client in clients.items():
                    started = time.perf_counter()
                    reply = client.post("/inference", json=body)
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    if reply.status_code != 202:
                        raise RuntimeError(f"{side}: {reply.status_code} {reply.text}")
                    if i >= 20:
                        latency_ms[side].append(elapsed_ms)
        finally:
            for client in clients.values():
                client.close()
        waits = _waits_sent(redis_url)
    if waits < requests:
        raise RuntimeError(f"the primary ran {waits} WAITs for {requests} admissions that should wait")
    return {
        "requests_per_side": requests,
        "waits_sent": waits,
        "latency_ms": {side: summary(values) for side, values in latency_ms.items()},
    }


def _waits_sent(redis_url: str) -> int:
    """How many WAITs the primary ran (its command statistics): proof the "on" side waited."""
    primary = Redis.from_url(redis_url)
    try:
        return int(primary.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    finally:
        primary.close()


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    off, on = result["latency_ms"]["off"], result["latency_ms"]["on"]
    rows = [
        "| admission (POST /inference to 202) | p50 (ms) | p99 (ms) |",
        "|---|---|---|",
        f"| `GPUTORRENT_WAIT_REPLICAS=0` | {off['p50']:.2f} | {off['p99']:.2f} |",
        f"| `auto` (waits for the replica) | {on['p50']:.2f} | {on['p99']:.2f} |",
        f"| added by the wait | +{on['p50'] - off['p50']:.2f} | +{on['p99'] - off['p99']:.2f} |",
        f"\n{result['requests_per_side']} admissions a side, alternated; one replica on the same machine; the "
        f"primary ran {result['waits_sent']} WAITs (the waiting side's admissions, and its worker's results).",
    ]
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["p50", "p99"]
    for offset, side in enumerate(("off", "on")):
        values = [result["latency_ms"][side][p] for p in ("p50", "p99")]
        ax.bar([i + offset * 0.4 for i in range(2)], values, width=0.4, label=f"WAIT {side}")
    ax.set_xticks([0.2, 1.2], labels)
    ax.set_ylabel("ms to the 202")
    ax.legend()
    ax.set_title("B8 admission with and without waiting for a replica")
    save_plot(fig, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    result = run(args.requests)
    print(table(result))
    print(f"written to {write_result('replication_wait', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
