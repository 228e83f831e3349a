"""B11, scale: what the pool costs as its number of workers grows (100, 1,000, 10,000), on one Redis.

For each size the run starts a private Redis-compatible server, a coordinator with authentication
on, and that many simulated workers (`gputorrent.worker.simulated`: each registers, beats, and
takes and finishes jobs with a real worker's code, on the fake backend, which answers at once), and
waits until all are registered, beating and blocked waiting for work. Simulated workers block
`SIMULATED_TAKE_BLOCK_S` at a time where a real one blocks `POP_TIMEOUT_S`, or `IDLE_POP_TIMEOUT_S`
once it has been idle for `IDLE_AFTER_S` (one process cannot wake 10,000 consumers that often); what
a real worker's shorter blocks cost an idle pool is measured on its own at the end, with 1,000
workers blocking each way. It then measures, in order:

- idle: 10 s with no request. Redis commands and CPU per second: what the workers' beats and
  blocked takes cost whether or not anyone asks anything (heartbeat traffic).
- load: Poisson arrivals at a fixed rate (the same at every size) of OpenAI completions
  (`POST /v1/completions`, which answers with the result). Added latency p50 and p99 (the backend takes no time, so
  the whole latency is what the pool adds), and Redis commands and CPU per request with the idle
  cost of the same span taken off.
- peak: closed-loop requests from 32 clients for a few seconds: admissions per second, and Redis
  CPU per request there (idle cost off), where the pool's periodic work weighs least.
- Redis memory per worker: used memory with the workers registered and idle, less the empty server's.
- the coordinator's CPU per request under load (its idle CPU taken off), and the share of a core
  the coordinator and the simulation each take under load: every process here shares two cores,
  so the simulation's share is what the harness takes from the pool it measures.

Every figure at 1,000 and 10,000 workers is also given as a ratio to the one at 100, measured in
the same run. Each size runs on one Redis and on a Redis Cluster of three primaries (tests/cluster.py,
the pool given its `redis+cluster://` URL), where each primary's share of the commands during the
load step is given too (the target: each within 15% of a third).

    bench/.venv/bin/python bench/scale.py --sizes 100 1000 10000 --shards 1 3

Prints a Markdown table and writes bench/results/scale.json and docs/images/bench-scale.png
(`bench/report.py` puts the table in docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from pool import Pool, Processes, process_cpu_s, redis_cpu_s, save_plot, start_pool, summary, write_result
from redis import Redis as SyncRedis

from gputorrent import auth, keys, redis_client
from gputorrent.embedded import EmbeddedRedis
from gputorrent.worker.main import IDLE_AFTER_S, IDLE_POP_TIMEOUT_S, POP_TIMEOUT_S

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: the tests' cluster
from tests.cluster import PRIMARIES, ClusterDeployment

SIZES = (100, 1000, 10_000)
SHARDS = (1, PRIMARIES)  # one Redis, and a cluster
RATE_PER_S = 100  # the load step's arrivals: well under the peak at every size, so latency is not queueing
LOAD_SECONDS = 10.0
IDLE_SECONDS = 10.0
PEAK_SECONDS = 5.0
PEAK_CLIENTS = 32
CLIENT_KEYS = PEAK_CLIENTS  # the API keys the load comes from: one a peak client
# Each simulated worker holds a connection for its blocked take, as a real one does beside its heartbeat's,
# its listener's and its scripts' (which simulated workers share): 10,000 need more than Redis's default
# 10,000 clients, and more open files than a process may get by default.
MAXCLIENTS = 19_000


def more_open_files() -> None:
    """Raise this process's open-file limit to its hard limit (20,000 here: Redis then takes 19,968 clients)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


READY_TIMEOUT_S = 600
# One process on one core cannot wake 10,000 idle consumers as often as real ones wake (every
# `POP_TIMEOUT_S`, or `IDLE_POP_TIMEOUT_S` once idle): the simulated ones block this long, at every size.
# What a real worker's idle look costs is measured on its own (`idle_cost`) at `REAL_BLOCK_IDLE_WORKERS`.
SIMULATED_TAKE_BLOCK_S = 20.0
REAL_BLOCK_IDLE_WORKERS = 1000
BODY = {"model": "fake", "prompt": "go", "max_tokens": 4}
IMAGES = Path(__file__).parent.parent / "docs" / "images"


class RedisCounters:
    """Commands processed and CPU used by the Redis servers of a pool (one, or a cluster's primaries),
    read before and after a span."""

    def __init__(self, server_urls: list[str]) -> None:
        self._clients = [SyncRedis.from_url(url) for url in server_urls]
        self.server_urls = server_urls

    def read(self) -> Reading:
        """(commands processed so far, CPU seconds so far, monotonic time, commands per server)."""
        each = [int(client.info("stats")["total_commands_processed"]) for client in self._clients]
        return sum(each), sum(redis_cpu_s(url) for url in self.server_urls), time.monotonic(), each

    def used_memory(self) -> int:
        return sum(int(client.info("memory")["used_memory"]) for client in self._clients)

    def blocked_clients(self) -> int:
        return sum(int(client.info("clients")["blocked_clients"]) for client in self._clients)

    def close(self) -> None:
        for client in self._clients:
            client.close()


Reading = tuple[int, float, float, list[int]]  # what `RedisCounters.read` gives


def rates(before: Reading, after: Reading) -> tuple[float, float]:
    """Commands per second and CPU seconds per second between two `RedisCounters.read`s."""
    span = after[2] - before[2]
    return (after[0] - before[0]) / span, (after[1] - before[1]) / span


def client_headers(pool: Pool, count: int) -> list[dict[str, str]]:
    """The headers of `count` client keys of the pool (its own first, then new ones), for load that comes
    from many clients as a pool's does: each key's rate counters lie in one cell, so a single key would
    put every request's counting on one shard."""

    async def create(redis_url: str) -> list[str]:
        redis = redis_client.async_client(redis_url)
        try:
            return [(await auth.create_key(redis, f"bench client {i}", "client"))[1] for i in range(1, count)]
        finally:
            await redis.aclose()

    made = asyncio.run(create(pool.redis_url))
    return [pool.headers, *({"Authorization": f"Bearer {key}"} for key in made)]


async def _one(http: aiohttp.ClientSession, url: str, at: float, headers: dict[str, str]) -> float | None:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    started = time.perf_counter()
    try:
        async with http.post(url, json=BODY, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                return None
    except (aiohttp.ClientError, TimeoutError):
        return None
    return (time.perf_counter() - started) * 1000


async def open_loop(base: str, clients: list[dict[str, str]], rate: float, seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of the requests that completed, and how many failed; the requests take turns
    with the `clients`' headers (`client_headers`)."""
    rng = random.Random(7)  # the same arrivals at every size
    arrivals, at = [], 0.0
    while (at := at + rng.expovariate(rate)) < seconds:
        arrivals.append(at)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.perf_counter() + 0.05
        url = f"{base}/v1/completions"
        done = await asyncio.gather(
            *(_one(http, url, start + a, clients[i % len(clients)]) for i, a in enumerate(arrivals))
        )
    served = [d for d in done if d is not None]
    return served, len(done) - len(served)


async def closed_loop(base: str, headers: list[dict[str, str]], clients: int, seconds: float) -> tuple[int, int]:
    """Requests completed and failed by `clients` back-to-back clients in `seconds`, client i with
    `headers[i % len(headers)]`."""
    completed, failed = 0, 0
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:

        async def client(own: dict[str, str]) -> None:
            nonlocal completed, failed
            while time.perf_counter() < deadline:
                if await _one(http, f"{base}/v1/completions", 0.0, own) is None:
                    failed += 1
                else:
                    completed += 1

        await asyncio.gather(*(client(headers[i % len(headers)]) for i in range(clients)))
    return completed, failed


def start_simulation(
    procs: Processes, pool_url: str, redis_url: str, join_key: str, count: int, take_block_s: float,
    *, model: str | None = None, id_prefix: str | None = None,
) -> int:  # fmt: skip
    """Simulated workers in one process (of `model`, ids from `id_prefix`, else the simulation's
    defaults); returns its pid once every one is registered and consuming."""
    command = [sys.executable, "-m", "gputorrent.worker.simulated", "--count", str(count), "--coordinator", pool_url,
               "--redis-url", redis_url, "--join-token", join_key, "--take-block-s", str(take_block_s)]  # fmt: skip
    if model is not None:
        command += ["--model", model]
    if id_prefix is not None:
        command += ["--id-prefix", id_prefix]
    child = procs.start(command, stdout=subprocess.PIPE, preexec_fn=more_open_files)
    assert child.stdout is not None
    line = child.stdout.readline().decode()  # blocks until `ready N`, or EOF if it died
    if not line.startswith("ready"):
        raise RuntimeError(f"the simulated workers did not start (exit code {child.poll()}): {line!r}")
    return child.pid


def wait_settled(redis_url: str, counters: RedisCounters, count: int) -> None:
    """Wait until `settled`, for up to `READY_TIMEOUT_S`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not settled(redis_url, counters, count):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not settle")
        time.sleep(0.5)


def settled(redis_url: str, counters: RedisCounters, count: int) -> bool:
    """Whether `count` workers are registered, each has a live heartbeat, and nine in ten of them are
    blocked waiting for work (connected, done with their first look at the queues)."""
    if counters.blocked_clients() < 0.9 * count:
        return False
    with redis_client.sync_client(redis_url) as redis:
        ids = set().union(*(redis.smembers(keys.workers(cell)) for cell in keys.cells()))  # on a cluster, 12 cells
        if len(ids) < count:
            return False
        with redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.exists(keys.heartbeat_key(worker_id.decode()))
            return sum(pipe.execute()) >= count


@contextlib.contextmanager
def redis_servers(shards: int) -> Iterator[tuple[str, list[str]]]:
    """A private Redis (`shards` 1) or Redis Cluster of `PRIMARIES` primaries: (the pool's URL, each
    primary's own URL), with room for `MAXCLIENTS` clients on each."""
    if shards == 1:
        redis = EmbeddedRedis().start(preexec_fn=more_open_files)
        try:
            yield redis.url, [redis.url]
        finally:
            redis.stop()
        return
    assert shards == PRIMARIES, f"a cluster here has {PRIMARIES} primaries"
    more_open_files()  # the nodes inherit this process's limit
    with (
        tempfile.TemporaryDirectory(prefix="gputorrent-scale-") as workdir,
        ClusterDeployment(Path(workdir)) as cluster,
    ):
        yield cluster.url, [f"redis://{node.address}:{node.port}" for node in cluster.primaries()]


@contextlib.contextmanager
def simulated_pool(
    count: int, take_block_s: float, shards: int = 1
) -> Iterator[tuple[Pool, RedisCounters, float, int, int]]:
    """A private Redis (or cluster), a coordinator and `count` simulated workers, settled: (the pool,
    the servers' counters, seconds the registrations took, the servers' used memory before any, the
    simulation's pid)."""
    with redis_servers(shards) as (redis_url, server_urls), Processes() as procs:
        counters = RedisCounters(server_urls)
        for url in server_urls:
            with SyncRedis.from_url(url) as admin:
                admin.config_set("maxclients", MAXCLIENTS)
        empty_memory = counters.used_memory()
        pool = start_pool(procs, redis_url)
        registering = time.monotonic()
        simulation_pid = start_simulation(procs, pool.url, redis_url, pool.join_key, count, take_block_s)
        registered_s = time.monotonic() - registering
        wait_settled(redis_url, counters, count)
        print(f"{count} workers on {shards} shard(s): registered in {registered_s:.1f} s", file=sys.stderr)
        try:
            yield pool, counters, registered_s, empty_memory, simulation_pid
        finally:
            counters.close()


def idle_cost(count: int, take_block_s: float) -> tuple[float, float]:
    """Redis commands and CPU seconds per second, per worker, of `count` idle workers."""
    with simulated_pool(count, take_block_s) as (_, counters, _, _, _):
        before = counters.read()
        time.sleep(IDLE_SECONDS)
        commands, cpu = rates(before, counters.read())
    return commands / count, cpu / count


def measure_size(count: int, shards: int) -> dict[str, Any]:
    with simulated_pool(count, SIMULATED_TAKE_BLOCK_S, shards) as (pool, counters, registered_s, empty_memory, sim):
        clients = client_headers(pool, CLIENT_KEYS)
        asyncio.run(closed_loop(pool.url, clients, len(clients), 2.0))  # warm the coordinator's paths (and key cache)
        memory_per_worker = (counters.used_memory() - empty_memory) / count

        def processes_cpu_s() -> tuple[float, float]:
            return process_cpu_s(pool.coordinator.pid), process_cpu_s(sim)

        before, cpu_before = counters.read(), processes_cpu_s()
        time.sleep(IDLE_SECONDS)
        after, cpu_after = counters.read(), processes_cpu_s()
        idle_commands, idle_cpu = rates(before, after)
        idle_span_s = after[2] - before[2]
        coordinator_idle, simulation_idle = ((b - a) / idle_span_s for a, b in zip(cpu_before, cpu_after, strict=True))

        before, cpu_before = counters.read(), processes_cpu_s()
        latencies, errors = asyncio.run(open_loop(pool.url, clients, RATE_PER_S, LOAD_SECONDS))
        after, cpu_after = counters.read(), processes_cpu_s()
        load_commands, load_cpu = rates(before, after)
        span_s = after[2] - before[2]
        coordinator_load, simulation_load = ((b - a) / span_s for a, b in zip(cpu_before, cpu_after, strict=True))
        requests = len(latencies)
        by_server = [late - early for early, late in zip(before[3], after[3], strict=True)]

        before = counters.read()
        completed, failed = asyncio.run(closed_loop(pool.url, clients, PEAK_CLIENTS, PEAK_SECONDS))
        after = counters.read()
        peak_span_s = after[2] - before[2]
        _, peak_cpu = rates(before, after)
    result: dict[str, Any] = {
        "workers": count,
        "shards": shards,
        "command_share_by_shard": [n / max(sum(by_server), 1) for n in by_server],
        "registration_s": registered_s,
        "idle_commands_per_s": idle_commands,
        "idle_redis_cpu_per_s": idle_cpu,
        "requests": requests,
        "errors": errors + failed,
        "latency_ms": summary(latencies) if latencies else None,
        "commands_per_request": (load_commands - idle_commands) * span_s / max(requests, 1),
        "redis_cpu_ms_per_request": (load_cpu - idle_cpu) * span_s / max(requests, 1) * 1000,
        "redis_cpu_ms_per_request_with_idle": load_cpu * span_s / max(requests, 1) * 1000,
        "peak_per_s": completed / peak_span_s,
        "redis_cpu_ms_per_request_at_peak": (peak_cpu - idle_cpu) * peak_span_s / max(completed, 1) * 1000,
        "redis_memory_per_worker_bytes": memory_per_worker,
        # The harness's share of the two cores, beside the pool's: CPU seconds a second, idle and under load.
        "coordinator_cpu_per_s": {"idle": coordinator_idle, "load": coordinator_load},
        "simulation_cpu_per_s": {"idle": simulation_idle, "load": simulation_load},
        "coordinator_cpu_ms_per_request": (coordinator_load - coordinator_idle) * span_s / max(requests, 1) * 1000,
    }
    print(f"{count} workers, {shards} shard(s): {result}", file=sys.stderr)
    return result


def table(result: dict[str, Any]) -> str:
    def ratio(value: float, reference: float) -> str:
        return f"{value / reference:.2f}" if reference else "n/a"

    def processes(r: dict[str, Any]) -> str:
        if "coordinator_cpu_per_s" not in r:  # a result from before these were measured
            return "— | —"
        return (f"{r['coordinator_cpu_ms_per_request']:.2f} | {r['coordinator_cpu_per_s']['load']:.0%}, "
                f"{r['simulation_cpu_per_s']['load']:.0%}")  # fmt: skip

    rows = [
        "| shards | workers | added p50 ms | added p99 ms | p50 vs the smallest | Redis commands a request "
        "| Redis CPU ms a request | vs the smallest | peak requests/s | Redis CPU ms a request at peak "
        "| vs the smallest | idle: Redis commands/s | idle: Redis CPU | Redis bytes a worker "
        "| shards' shares of commands | coordinator CPU ms a request | under load: coordinator, simulation CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in result["sizes"]:
        shards = r.get("shards", 1)
        base = next(b for b in result["sizes"] if b.get("shards", 1) == shards)  # the smallest on as many shards
        latency = r["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
        shares = r.get("command_share_by_shard", [1.0])
        rows.append(
            f"| {shards} | {r['workers']:,} | {latency['p50']:.2f} | {latency['p99']:.2f} "
            f"| {ratio(latency['p50'], (base['latency_ms'] or latency)['p50'])} "
            f"| {r['commands_per_request']:.0f} | {r['redis_cpu_ms_per_request']:.3f} "
            f"| {ratio(r['redis_cpu_ms_per_request'], base['redis_cpu_ms_per_request'])} "
            f"| {r['peak_per_s']:,.0f} | {r['redis_cpu_ms_per_request_at_peak']:.3f} "
            f"| {ratio(r['redis_cpu_ms_per_request_at_peak'], base['redis_cpu_ms_per_request_at_peak'])} "
            f"| {r['idle_commands_per_s']:,.0f} | {r['idle_redis_cpu_per_s'] * 100:.1f}% "
            f"| {r['redis_memory_per_worker_bytes']:,.0f} "
            f"| {' / '.join(f'{share:.0%}' for share in sorted(shares, reverse=True)) if shards > 1 else '—'} "
            f"| {processes(r)} |"
        )
    short, long = result["idle_real_blocks"]
    rows.append(
        f"\nIdle workers as real ones ({short['workers']:,} of them, one Redis), per worker: blocking "
        f"{short['take_block_s']:g} s at a time (a job in the last {result['idle_after_s']:g} s), "
        f"{short['commands_per_s_per_worker']:.1f} Redis commands and "
        f"{short['redis_cpu_per_s_per_worker'] * 1e6:.0f} µs of Redis CPU a second; "
        f"blocking {long['take_block_s']:g} s (idle longer), "
        f"{long['commands_per_s_per_worker']:.1f} and {long['redis_cpu_per_s_per_worker'] * 1e6:.0f} µs."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    sizes = [r for r in result["sizes"] if r.get("shards", 1) == 1]  # one Redis: the cluster's are in the table
    rate = result["rate_per_s"]
    workers = [r["workers"] for r in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(workers, [r["latency_ms"]["p50"] for r in sizes], "o-", label="added p50")
    left.plot(workers, [r["latency_ms"]["p99"] for r in sizes], "s--", label="added p99")
    left.set(xscale="log", yscale="log", xlabel="workers", ylabel="ms", title=f"Added latency at {rate} requests/s")
    left.legend()
    right.plot(workers, [r["redis_cpu_ms_per_request"] for r in sizes], "o-",
               label=f"a request at {rate}/s (idle cost off)")  # fmt: skip
    right.plot(workers, [r["redis_cpu_ms_per_request_at_peak"] for r in sizes], "^-", label="a request, at the peak")
    right.plot(workers, [r["idle_redis_cpu_per_s"] * 1000 / rate for r in sizes], "s--",
               label=f"the idle pool's, spread over {rate} requests/s")  # fmt: skip
    right.set(xscale="log", xlabel="workers", ylabel="Redis CPU ms", title="Redis CPU per request")
    right.legend()
    save_plot(fig, out)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--shards", type=int, nargs="+", default=list(SHARDS), choices=SHARDS)
    args = parser.parse_args()
    sizes = [measure_size(count, shards) for shards in args.shards for count in args.sizes]
    idle_real_blocks = []
    for block_s in (POP_TIMEOUT_S, IDLE_POP_TIMEOUT_S):
        commands, cpu = idle_cost(REAL_BLOCK_IDLE_WORKERS, block_s)
        idle_real_blocks.append({"workers": REAL_BLOCK_IDLE_WORKERS, "take_block_s": block_s,
                                 "commands_per_s_per_worker": commands, "redis_cpu_per_s_per_worker": cpu})  # fmt: skip
    result = {
        "rate_per_s": RATE_PER_S,
        "simulated_take_block_s": SIMULATED_TAKE_BLOCK_S,
        "sizes": sizes,
        "idle_after_s": IDLE_AFTER_S,
        "idle_real_blocks": idle_real_blocks,
    }
    write_result("scale", result)
    plot(result, IMAGES / "bench-scale.png")
    print(table(result))


if __name__ == "__main__":
    main()
