"""What one read of the pool costs the coordinator, with real workers' heartbeats (each carries telemetry).

Routing reads the pool through `registry.snapshot`, which since 2026-12-07 leaves each heartbeat's
telemetry in Redis; the listings that show it (`/workers`, `/pool`, `/metrics`) add it with
`registry.with_telemetry`, which reads the heartbeats again. The second side is the read as every
snapshot did it before (the telemetry parsed with the rest), and one more `MGET` a step. For N
workers registered in a private Redis, each beating like a busy worker of one model (two GPUs, job
counters and three latency histograms: about 900 bytes), the two sides alternate `ROUNDS` times:
the coordinator's time a read (the median), and the objects the collector tracks that the read's
rows keep alive (the full collections of a large pool walk them all).

    bench/.venv/bin/python bench/snapshot_read.py --sizes 1000 10000

Prints a Markdown table (for docs/scaling.md, by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from gputorrent import auth, keys, registry
from gputorrent.embedded import EmbeddedRedis
from gputorrent.protocol import Hardware, Heartbeat, WorkerRecord, WorkerState
from gputorrent.telemetry import GPUSample, Histogram, MachineSample, ModelCounters, Telemetry

SIZES = (1000, 10_000)
ROUNDS = 5


def busy_heartbeat() -> Heartbeat:
    latencies = Histogram.empty()
    for seconds in (0.05, 0.3, 0.3, 1.2, 4.0, 12.0):
        latencies = latencies.observe(seconds)
    counters = ModelCounters(completed=120, failed=2, prompt_tokens=50_000, tokens_generated=90_000,
                             queue_wait=latencies, time_to_first_token=latencies, latency=latencies)  # fmt: skip
    gpus = [GPUSample(index=i, name="NVIDIA H100 80GB HBM3", memory_used_bytes=40 * 2**30,
                      memory_total_bytes=80 * 2**30, utilization_ratio=0.7, temperature_celsius=61.0)
            for i in range(2)]  # fmt: skip
    machine = MachineSample(gpus=gpus, cpu_utilization_ratio=0.3, ram_used_bytes=2**34, ram_total_bytes=2**37)
    telemetry = Telemetry(sampled_at=time.time(), machine=machine, jobs={"llama3:8b": counters})
    return Heartbeat(at=time.time(), jobs_in_flight=1, telemetry=telemetry, tokens_per_s=40.0)


async def fill(redis: Redis, count: int) -> int:
    """`count` registered workers beating busily; the size of one heartbeat in bytes."""
    secret = auth.hash_secret("bench")
    beat = busy_heartbeat().model_dump_json()
    for i in range(count):
        worker_id = f"w{i:05d}"
        record = WorkerRecord(worker_id=worker_id, models=["llama3:8b"], backend="llamacpp", slots=1,
                              hardware=Hardware(), registered_at=time.time())  # fmt: skip
        await registry.register(redis, record, heartbeat_ttl_s=3600, secret_hash=secret)
        await redis.set(keys.heartbeat_key(worker_id), beat, ex=3600)
    return len(beat)


async def measured(read: Callable[[], Awaitable[list[WorkerState]]]) -> tuple[float, int]:
    """(seconds the read took, objects tracked by the collector that its rows keep alive)."""
    gc.collect()
    before = len(gc.get_objects())
    started = time.perf_counter()
    rows = await read()
    took = time.perf_counter() - started
    gc.collect()
    kept = len(gc.get_objects()) - before
    del rows
    return took, kept


async def measure(url: str, count: int) -> dict[str, float]:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        await redis.flushdb()
        beat_bytes = await fill(redis, count)

        async def routing() -> list[WorkerState]:
            return await registry.snapshot(redis)

        async def listing() -> list[WorkerState]:
            return await registry.with_telemetry(redis, await registry.snapshot(redis))

        sides: dict[str, list[tuple[float, int]]] = {"routing": [], "listing": []}
        await listing()  # the records' parse cache filled, as in a running coordinator
        for _ in range(ROUNDS):
            sides["routing"].append(await measured(routing))
            sides["listing"].append(await measured(listing))
        return {"workers": count, "heartbeat_bytes": beat_bytes} | {
            f"{side}_{what}": statistics.median(sample[i] for sample in samples)
            for side, samples in sides.items() for i, what in enumerate(("s", "objects"))
        }  # fmt: skip
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()
    with EmbeddedRedis() as embedded:
        results = [asyncio.run(measure(embedded.url, count)) for count in args.sizes]
    print("| workers | routing's read (snapshot): time | objects kept "
          "| with the telemetry (as before; the listings now): time | objects kept | time, ratio |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']:,} | {r['routing_s'] * 1000:.0f} ms | {r['routing_objects']:,.0f} | "
              f"{r['listing_s'] * 1000:.0f} ms | {r['listing_objects']:,.0f} | "
              f"{r['listing_s'] / r['routing_s']:.2f} |")  # fmt: skip
    print(f"\nOne heartbeat: {results[0]['heartbeat_bytes']} bytes; the median of {ROUNDS} reads a side, alternating.")


if __name__ == "__main__":
    main()
