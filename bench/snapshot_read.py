"""What one read of the pool costs the coordinator, with real workers' heartbeats (each carries telemetry).

Routing reads the pool through `registry.snapshot`, which since 2026-12-07 leaves each heartbeat's
telemetry in Redis, and in the coordinator reads the records only when the registry's version moved
(it keeps them: `registry.KnownRecords`). The listings that show the telemetry (`/workers`, `/pool`,
`/metrics`) add it with `registry.with_telemetry`, which reads the heartbeats again. Three sides:
routing's read with the records known (the first), routing's read of everything (as a read whose
version moved, or a reader without `KnownRecords`), and that read with the telemetry (as every
snapshot read before 2026-12-07, and one more `MGET` a step). For N workers registered in a private
Redis, each beating like a busy worker of one model (two GPUs, job counters and three latency
histograms: about 900 bytes), the sides alternate `ROUNDS` times: the coordinator's time a read (the
median), the Redis CPU its commands took (`INFO commandstats`), and the objects the collector tracks
that the read's rows keep alive (the full collections of a large pool walk them all).

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


async def measured(redis: Redis, read: Callable[[], Awaitable[list[WorkerState]]]) -> tuple[float, int, float]:
    """(seconds the read took, objects tracked by the collector that its rows keep alive, milliseconds
    of Redis's CPU its commands took: `INFO commandstats`)."""
    gc.collect()
    before = len(gc.get_objects())
    await redis.config_resetstat()
    started = time.perf_counter()
    rows = await read()
    took = time.perf_counter() - started
    stats = await redis.info("commandstats")
    redis_ms = sum(v["usec"] for k, v in stats.items() if "config" not in k and "info" not in k) / 1000
    gc.collect()
    kept = len(gc.get_objects()) - before
    del rows
    return took, kept, redis_ms


async def measure(url: str, count: int) -> dict[str, float]:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        await redis.flushdb()
        beat_bytes = await fill(redis, count)

        async def routing() -> list[WorkerState]:
            return await registry.snapshot(redis)

        async def listing() -> list[WorkerState]:
            return await registry.with_telemetry(redis, await registry.snapshot(redis))

        known = registry.KnownRecords()

        async def known_routing() -> list[WorkerState]:
            return await registry.snapshot(redis, known)

        reads = {"known": known_routing, "routing": routing, "listing": listing}
        sides: dict[str, list[tuple[float, int, float]]] = {side: [] for side in reads}
        await listing()  # the records' parse cache filled, as in a running coordinator
        await known_routing()  # and the records known, as after a coordinator's first read
        for _ in range(ROUNDS):
            for side, read in reads.items():
                sides[side].append(await measured(redis, read))
        return {"workers": count, "heartbeat_bytes": beat_bytes} | {
            f"{side}_{what}": statistics.median(sample[i] for sample in samples)
            for side, samples in sides.items() for i, what in enumerate(("s", "objects", "redis_ms"))
        }  # fmt: skip
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()
    with EmbeddedRedis() as embedded:
        results = [asyncio.run(measure(embedded.url, count)) for count in args.sizes]
    print("| workers | routing's read, records known: time | Redis CPU "
          "| routing's read, records read: time | Redis CPU | objects kept "
          "| with the telemetry (the listings): time | objects kept |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']:,} | {r['known_s'] * 1000:.0f} ms | {r['known_redis_ms']:.1f} ms "
              f"| {r['routing_s'] * 1000:.0f} ms | {r['routing_redis_ms']:.1f} ms | {r['routing_objects']:,.0f} "
              f"| {r['listing_s'] * 1000:.0f} ms | {r['listing_objects']:,.0f} |")  # fmt: skip
    print(f"\nOne heartbeat: {results[0]['heartbeat_bytes']} bytes; the median of {ROUNDS} reads a side, alternating.")


if __name__ == "__main__":
    main()
