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

    bench/.venv/bin/python bench/redis_path.py --calls 5000

Prints a Markdown table and writes bench/results/redis_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pool import save_plot, summary, write_result
from redis.asyncio import Redis

from gputorrent.embedded import EmbeddedRedis
from gputorrent.pipelined import pipelined

SCRIPT = "return redis.call('LLEN', KEYS[1])"
KEYS_AND_ARGUMENTS = [f"processing:worker-{i:04d}" for i in range(12)] + [f"argument-{i}" for i in range(11)]
LABELS = {"redis_py": "redis-py", "own": "the project's layer"}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000, help="script calls per side")
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
