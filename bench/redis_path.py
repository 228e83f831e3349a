"""The Redis path of a request: redis-py's asyncio client against the project's own layer, call by call.

The coordinator and the worker send the scripts on a request's way through
`gputorrent/pipelined.py` (one shared connection, replies parsed with hiredis, on redis-py's
connections' private reader and writer). This measures what it saves against redis-py's own asyncio
client, which parses with hiredis too when it is installed (it is, `redis[hiredis]`): a script call
shaped like the take script (`EVALSHA` with 23 keys and arguments; the script does one `LLEN`, so
the server's share is small and the same on both sides), through `Redis.evalsha` and through
`pipelined(...).execute`, alternating call by call, one at a time, then with 8 callers at once,
each side alone (CPU a call). (The coordinator's subscription reader, compared here too until it
gave way to redis-py's `PubSub`, is redis-py's own now.)

Each side's latency is its p50 and p99; its CPU is the benchmark process's CPU time (the event
loop included) summed over its own calls. On uvloop, as the coordinator and the worker run.

Then end to end, which is what the rule of docs/benchmarks.md weighs (code of our own stays only
where the library costs more than a tenth of GPU Torrent's added latency): two pools in one run,
each a coordinator and one `openai` worker on a Redis of its own, in front of the same fast server
(bench/fast_openai_server.py), one on the project's layer and one with every call of it through
redis-py (bench/redis_py_path.py). The same chat completion goes to the fast server directly, to
the bare hops on FastAPI (bench/bare_relay.py) and to each pool in turn, one at a time (B1's way);
then each pool alone takes `--requests` with 8 callers at once, in four turns each, for the
latency under load (the order of the sides reversed each turn), and B1's CPU phases (the
coordinator's, the worker's and Redis's CPU a request), each side's twice, in both orders, with
half of `--cpu-requests` each time.

    bench/.venv/bin/python bench/redis_path.py --calls 5000 --requests 1000

Prints a Markdown table and writes bench/results/redis_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from added_latency import complete, cpu_per_request
from added_latency import measure as alternate
from pool import Processes, save_plot, start_bare_relay, start_fast_server, start_pool, summary, write_result
from redis.asyncio import Redis

from gputorrent.embedded import EmbeddedRedis
from gputorrent.pipelined import pipelined

SCRIPT = "return redis.call('LLEN', KEYS[1])"
KEYS_AND_ARGUMENTS = [f"processing:worker-{i:04d}" for i in range(12)] + [f"argument-{i}" for i in range(11)]
LABELS = {"redis_py": "redis-py", "own": "the project's layer"}
POOL_LABELS = {
    "bare_fastapi": "bare hops on FastAPI",
    "own": "GPU Torrent, the project's layer",
    "redis_py": "GPU Torrent, redis-py",
}
CONCURRENCY = 8
ROUNDS = 4  # turns of each side alone at CONCURRENCY
HERE = Path(__file__).resolve().parent


async def timed(call: Callable[[], Awaitable[object]], latency: list[float], cpu: list[float]) -> None:
    started, started_cpu = time.perf_counter(), time.process_time()
    await call()
    latency.append((time.perf_counter() - started) * 1e6)
    cpu.append((time.process_time() - started_cpu) * 1e6)


async def scripts(redis: Redis, calls: int) -> dict[str, dict[str, list[float]]]:
    sha = await redis.script_load(SCRIPT)
    numkeys = 12
    samples: dict[str, dict[str, list[float]]] = {side: {"latency": [], "cpu": []} for side in LABELS}

    async def with_redis_py() -> object:
        return await redis.evalsha(sha, numkeys, *KEYS_AND_ARGUMENTS)  # type: ignore[misc]

    async def with_own() -> object:
        return await pipelined(redis).execute("EVALSHA", sha, numkeys, *KEYS_AND_ARGUMENTS)

    sides = {"redis_py": with_redis_py, "own": with_own}
    for _ in range(200):  # connections open, code paths warm
        for call in sides.values():
            await call()
    for _ in range(calls):
        for side, call in sides.items():
            await timed(call, samples[side]["latency"], samples[side]["cpu"])
    return samples


async def scripts_together(redis: Redis, calls: int, concurrency: int) -> dict[str, float]:
    """CPU a call with `concurrency` callers at once, each side alone in turn (so its CPU is its own)."""
    sha = await redis.script_load(SCRIPT)
    sides = {
        "redis_py": lambda: redis.evalsha(sha, 12, *KEYS_AND_ARGUMENTS),  # type: ignore[misc]
        "own": lambda: pipelined(redis).execute("EVALSHA", sha, 12, *KEYS_AND_ARGUMENTS),
    }
    cpu_us: dict[str, float] = {}
    for _ in range(2):  # the second round counts: the first warms the pool's connections
        for side, call in sides.items():

            async def caller(call: Callable[[], Awaitable[object]] = call) -> None:
                for _ in range(calls // concurrency):
                    await call()

            started = time.process_time()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            cpu_us[side] = (time.process_time() - started) * 1e6 / (calls // concurrency * concurrency)
    return cpu_us


async def measure(url: str, calls: int) -> dict[str, Any]:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        return {
            "script": await scripts(redis, calls),
            "script_cpu_us_8_at_once": await scripts_together(redis, calls, 8),
        }
    finally:
        await redis.aclose()


def redis_py_command(*args: str) -> list[str]:
    """A `gputorrent` subcommand's command line with its scripts' Redis path through redis-py."""
    return [sys.executable, str(HERE / "redis_py_path.py"), "--log-level", "warning", *args]


async def timed_load(url: str, headers: dict[str, str], requests: int, concurrency: int) -> list[float]:
    """Milliseconds of each of `requests` chat completions sent `concurrency` at a time."""
    remaining, latencies = iter(range(requests)), []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def caller() -> None:
            for _ in remaining:
                latencies.append(await complete(http, url, headers))

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


def end_to_end(requests: int, cpu_requests: int) -> dict[str, Any]:
    """The two pools side by side (see the module's docstring): samples in ms, CPU in ms a request."""
    with EmbeddedRedis() as own_redis, EmbeddedRedis() as py_redis, Processes() as procs:
        fast = start_fast_server(procs)
        pools = {
            "own": start_pool(procs, own_redis.url),
            "redis_py": start_pool(procs, py_redis.url, command=redis_py_command),
        }
        worker_args = ["--backend", "openai", "--openai-base-url", fast, "--model", "fast", "--slots", str(CONCURRENCY)]
        workers = {side: pool.add_worker(worker_args) for side, pool in pools.items()}
        bare = start_bare_relay(procs, own_redis.url, fast, on_fastapi=True)
        for pool in pools.values():
            pool.wait_for_model("fast")
        sides = {
            "direct": (f"{fast}/chat/completions", {}),
            "bare_fastapi": (f"{bare.url}/chat/completions", {}),
            **{side: (f"{pool.url}/v1/chat/completions", pool.headers) for side, pool in pools.items()},
        }
        one_at_a_time = asyncio.run(alternate(sides, requests))
        together: dict[str, list[float]] = {side: [] for side in sides}
        order = list(sides)
        for _ in range(ROUNDS):  # each side alone, in turns, so a slow spell of the machine falls on all
            for side in order:
                url, headers = sides[side]
                together[side] += asyncio.run(timed_load(url, headers, requests // ROUNDS, CONCURRENCY))
            order.reverse()  # and no side always goes first
        cpu: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in pools}
        for order in (["own", "redis_py"], ["redis_py", "own"]):  # each side's CPU phases twice, in both orders
            for side in order:
                pool = pools[side]
                url, headers = sides[side]
                pids = (pool.coordinator.pid, workers[side].pid)
                cpu[side].append(cpu_per_request(url, headers, *pids, pool.redis_url, cpu_requests // 2))
    cpu_ms = {side: _mean_of(runs) for side, runs in cpu.items()}
    return {"one_at_a_time": one_at_a_time, "together": together, "cpu_ms_per_request": cpu_ms}


def _mean_of(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean of `cpu_per_request`'s figures over runs."""
    return {
        concurrency: {part: sum(run[concurrency][part] for run in runs) / len(runs) for part in parts}
        for concurrency, parts in runs[0].items()
    }


def added(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each path's p50 and p99 less the direct path's (ms)."""
    direct = summary(samples["direct"])
    return {
        side: {q: summary(values)[q] - direct[q] for q in ("p50", "p99")}
        for side, values in samples.items()
        if side != "direct"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000, help="script calls per side")
    parser.add_argument("--requests", type=int, default=1000, help="chat completions per side, end to end")
    parser.add_argument("--cpu-requests", type=int, default=2000, help="requests per CPU phase, end to end")
    args = parser.parse_args()
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with EmbeddedRedis() as embedded, asyncio.Runner(loop_factory=loop_factory) as runner:
        samples = runner.run(measure(embedded.url, args.calls))
    result: dict[str, Any] = {"calls": args.calls, "uvloop": loop_factory is not None}
    result["script_cpu_us_8_at_once"] = samples.pop("script_cpu_us_8_at_once")
    for kind, sides in samples.items():
        result[kind] = {
            side: {
                "latency": summary(figures["latency"]),
                "cpu_us": sum(figures["cpu"]) / len(figures["cpu"]),
                "count": len(figures["latency"]),
            }
            for side, figures in sides.items()
        }
    pools = end_to_end(args.requests, args.cpu_requests)
    result["end_to_end"] = {
        "requests": args.requests,
        "cpu_requests": args.cpu_requests,
        "added_ms": {kind: added(pools[kind]) for kind in ("one_at_a_time", "together")},
        "cpu_ms_per_request": pools["cpu_ms_per_request"],
    }
    write_result("redis_path", result)
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| what | through | p50 (µs) | p99 (µs) | CPU a call (µs) |",
        "|---|---|---|---|---|",
    ]
    for side, side_label in LABELS.items():
        f = result["script"][side]
        latency = f"{f['latency']['p50']:.0f} | {f['latency']['p99']:.0f}"
        rows.append(f"| a script call (23 keys and arguments) | {side_label} | {latency} | {f['cpu_us']:.0f} |")
    script = result["script"]
    rows.append(
        f"\nredis-py costs {script['redis_py']['latency']['p50'] - script['own']['latency']['p50']:.0f} µs more a "
        f"script call at p50 ({script['redis_py']['cpu_us'] - script['own']['cpu_us']:.0f} µs more CPU); "
        f"{script['own']['count']} calls a side, uvloop {'on' if result['uvloop'] else 'off'}."
    )
    together = result["script_cpu_us_8_at_once"]
    rows.append(
        f"\nWith 8 callers at once, CPU a script call: redis-py {together['redis_py']:.0f} µs, the project's layer "
        f"{together['own']:.0f} µs (each side alone)."
    )
    return "\n".join(rows) + "\n\n" + end_to_end_table(result["end_to_end"])


def end_to_end_table(e2e: dict[str, Any]) -> str:
    """The end-to-end rows: added latency both ways, CPU a request, and what the rule weighs."""
    one, together, cpu = e2e["added_ms"]["one_at_a_time"], e2e["added_ms"]["together"], e2e["cpu_ms_per_request"]
    rows = [
        "| path | added p50 (ms) | added p99 (ms) | added p50, 8 at once | added p99, 8 at once "
        "| coordinator CPU a request (ms), 1 / 8 at once | worker CPU | Redis CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, label in POOL_LABELS.items():
        latency = " | ".join(f"{f[side][q]:.2f}" for f in (one, together) for q in ("p50", "p99"))
        spent = " | ".join(
            f"{cpu[side]['1'][part]:.2f} / {cpu[side]['8'][part]:.2f}" if side in cpu else ""
            for part in ("front", "worker", "redis")
        )
        rows.append(f"| {label} | {latency} | {spent} |")
    lines = []
    for kind, figures in (("one at a time", one), ("8 at once", together)):
        more = figures["redis_py"]["p50"] - figures["own"]["p50"]
        lines.append(f"{kind}, {more:+.2f} ms ({more / figures['own']['p50']:+.0%} of the layer's added latency)")
    rows.append(
        f"\nredis-py against the layer, added latency at p50: {'; '.join(lines)}. "
        f"{e2e['requests']} requests a side each way; CPU: the mean of two phases of {e2e['cpu_requests'] // 2} "
        "requests a side, in both orders."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    sides = list(LABELS)
    for x, side in enumerate(sides):
        figures = result["script"][side]["latency"]
        ax.bar([x - 0.2], [figures["p50"]], 0.38, color="tab:blue", label="p50" if x == 0 else None)
        ax.bar([x + 0.2], [figures["p99"]], 0.38, color="tab:orange", label="p99" if x == 0 else None)
    ax.set_xticks(range(len(sides)), [LABELS[side] for side in sides])
    ax.set_ylabel("µs a script call")
    ax.set_title("The Redis path: redis-py against the project's layer")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
