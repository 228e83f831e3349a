"""Where the added p50 of a 10,000-worker pool goes: B11's unmet target (docs/scaling.md, "The p50").

Runs the load step of bench/scale.py (OpenAI completions arriving at 100 a second, 10 s) on one
Redis against pools that differ only in their idle workers: 100 simulated workers serve the model
asked for, in a process of their own, and 0 or `--idle` more serve another model, in another
process, registered, beating and blocked waiting for work. So the busy workers' process is the same
on both sides, and only the pool (Redis and the coordinator) carries the idle ones. The pool's
processes are pinned to the first CPU and the harness (both simulations and this load generator) to
the others; with `--nice` the idle workers' process runs at the lowest priority, so that it takes
the harness's CPU only when nothing else wants it. The two sides alternate, `--rounds` each.

For each side: the added latency (p50, p99), and its parts as the stored results give them:
admission (the coordinator, until the job is queued) and queued (from the enqueue until the worker
holds the job: Redis, the doorbell's wake and the worker process's loop); and the coordinator's full
garbage collections during the load (its `/metrics`).

    bench/.venv/bin/python bench/scale_probe.py --idle 9900 --rounds 2 [--nice]

Prints a Markdown table (for docs/scaling.md, by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from typing import Any

import httpx
from pool import Pool, Processes, start_pool, summary
from redis import Redis as SyncRedis
from scale import (
    LOAD_SECONDS,
    MAXCLIENTS,
    RATE_PER_S,
    SIMULATED_TAKE_BLOCK_S,
    RedisCounters,
    closed_loop,
    open_loop,
    redis_servers,
    start_simulation,
    wait_settled,
)

from gputorrent import keys

BUSY = 100
CPUS = sorted(os.sched_getaffinity(0))  # before a run narrows this process's own


def full_collections(pool: Pool) -> int:
    metrics = httpx.get(f"{pool.url}/metrics", params={"per_worker": "false"}, headers=pool.headers, timeout=30)
    metrics.raise_for_status()
    for line in metrics.text.splitlines():
        if line.startswith('python_gc_collections_total{generation="2"}'):
            return int(float(line.split()[-1]))
    raise RuntimeError("no python_gc_collections_total in /metrics")


def parts(redis: SyncRedis, request_ids: set[str]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"admission_ms": [], "queued_ms": []}
    for request_id in request_ids:
        if (raw := redis.get(keys.result_key(request_id))) is not None:
            timings = json.loads(raw)["timings"]
            for part, values in found.items():
                values.append(float(timings[part]))
    return found


def measure(idle: int, nice: bool) -> dict[str, Any]:
    with redis_servers(1) as (redis_url, server_urls), Processes() as procs:
        counters = RedisCounters(server_urls)
        with SyncRedis.from_url(server_urls[0], decode_responses=True) as redis:
            redis.config_set("maxclients", MAXCLIENTS)
            pool = start_pool(procs, redis_url)
            harness = [start_simulation(procs, pool.url, redis_url, pool.join_key, BUSY, SIMULATED_TAKE_BLOCK_S,
                                        model="fake", id_prefix="busy")]  # fmt: skip
            if idle:
                harness.append(start_simulation(procs, pool.url, redis_url, pool.join_key, idle,
                                                SIMULATED_TAKE_BLOCK_S, model="other", id_prefix="idle"))  # fmt: skip
            wait_settled(redis_url, counters, BUSY + idle)
            counters.close()
            first, *rest = CPUS
            for pid in (int(redis.info("server")["process_id"]), pool.coordinator.pid):
                os.sched_setaffinity(pid, {first})
            for pid in (*harness, 0):
                os.sched_setaffinity(pid, set(rest))
            if nice and idle:
                os.setpriority(os.PRIO_PROCESS, harness[1], 19)
            asyncio.run(closed_loop(pool.url, [pool.headers], 4, 2.0))  # warm the coordinator's paths
            results_before = set(redis.scan_iter(keys.result_key("*"), count=1000))
            collections_before = full_collections(pool)
            latencies, errors = asyncio.run(open_loop(pool.url, [pool.headers], RATE_PER_S, LOAD_SECONDS))
            collections = full_collections(pool) - collections_before
            new = set(redis.scan_iter(keys.result_key("*"), count=1000)) - results_before
            prefix = keys.result_key("")
            found = parts(redis, {key[len(prefix) :] for key in new})
    os.sched_setaffinity(0, set(CPUS))
    return {"idle": idle, "latency_ms": summary(latencies), "errors": errors, "full_collections": collections,
            **{part: summary(values) for part, values in found.items()}}  # fmt: skip


def table(runs: list[dict[str, Any]]) -> str:
    rows = ["| idle workers | added p50 ms | added p99 ms | admission p50 ms | queued p50 ms | queued p99 ms "
            "| full collections |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        rows.append(
            f"| {run['idle']:,} | {run['latency_ms']['p50']:.2f} | {run['latency_ms']['p99']:.2f} | "
            f"{run['admission_ms']['p50']:.2f} | {run['queued_ms']['p50']:.2f} | {run['queued_ms']['p99']:.2f} | "
            f"{run['full_collections']} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=9900, help="idle workers beside the 100 busy ones")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nice", action="store_true", help="the idle workers' process at the lowest priority")
    args = parser.parse_args()
    runs = [measure(idle, args.nice) for _ in range(args.rounds) for idle in (0, args.idle)]
    for run in runs:
        print(json.dumps(run), file=sys.stderr)
    sides = (0, args.idle)
    p50 = {idle: statistics.median(r["latency_ms"]["p50"] for r in runs if r["idle"] == idle) for idle in sides}
    print(table(runs))
    print(f"\nadded p50, median of the rounds: {p50[args.idle]:.2f} against {p50[0]:.2f} ms "
          f"({p50[args.idle] / p50[0]:.2f}); pool pinned to CPU {CPUS[0]}, nice: {args.nice}")  # fmt: skip


if __name__ == "__main__":
    main()
