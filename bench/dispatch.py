"""B3, dispatch: no-op jobs per second through GPU Torrent's queue against Celery's, on the same Redis.

One run starts a private Redis-compatible server, a coordinator with authentication on (for the
worker to register with its join key), one worker process on the `fake` backend, and a Celery
worker for a no-op task with that same server as its broker and result backend (another database
number). Each side then gets the same work in turn, for a few rounds: its client submits N jobs
one after another, as fast as it can, while its worker takes, runs and finishes them; the clock
stops when the last job's result is stored. Jobs per second is N over that time.

What each side does per job, so the two are the same work:
- GPU Torrent: `gputorrent.queue.enqueue` (what the coordinator's admission runs once it has
  routed the request: one script that records the job's status and pushes it onto the worker's
  queue) from this process; the worker's whole path: the take script, marking it running, a
  one-token generation on the `fake` backend, and the finish script that stores the result.
- Celery: `noop.apply_async()` from this process; the worker's whole path on Celery's defaults
  (prefork pool, one process per core), storing the task's result in Redis.
Completion is read the same way on both sides: one EXISTS over every result key, polled.

    bench/.venv/bin/python bench/dispatch.py --jobs 2000 --rounds 5

Prints a Markdown table and writes bench/results/dispatch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis as sync_redis
from pool import HERE, Processes, save_plot, start_pool, version, write_result
from redis.asyncio import Redis

from gputorrent import keys, queue
from gputorrent.embedded import EmbeddedRedis
from gputorrent.protocol import InferenceOptions, Job

WORKER_SLOTS = 4  # jobs the worker runs at once
CELERY_DB = 1
POLL_S = 0.005
TIMEOUT_S = 300


async def _wait_async(redis: Redis, result_keys: Sequence[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while await redis.exists(*result_keys) < len(result_keys):
        if time.monotonic() > deadline:
            raise RuntimeError("GPU Torrent's worker did not finish the jobs")
        await asyncio.sleep(POLL_S)


def _wait_sync(redis: sync_redis.Redis, result_keys: Sequence[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while redis.exists(*result_keys) < len(result_keys):
        if time.monotonic() > deadline:
            raise RuntimeError("Celery's worker did not finish the tasks")
        time.sleep(POLL_S)


async def ours(redis_url: str, worker_id: str, jobs: int) -> float:
    """Jobs per second: enqueue `jobs` no-op jobs for the worker, wait for every result."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        ids = [uuid.uuid4().hex for _ in range(jobs)]
        options = InferenceOptions(max_tokens=1)
        started = time.perf_counter()
        for request_id in ids:
            job = Job(
                request_id=request_id, worker_id=worker_id, model="fake", prompt="noop", options=options,
                enqueued_at=time.time(),
            )  # fmt: skip
            await queue.enqueue(redis, job, ttl_s=3600, owner="bench")
        await _wait_async(redis, [keys.result_key(i) for i in ids])
        return jobs / (time.perf_counter() - started)
    finally:
        await redis.aclose()


def celery(redis_url: str, jobs: int) -> float:
    """Tasks per second: send `jobs` no-op tasks, wait for every result."""
    import celery_noop

    redis = sync_redis.Redis.from_url(redis_url)
    try:
        ids = [uuid.uuid4().hex for _ in range(jobs)]
        started = time.perf_counter()
        for task_id in ids:
            celery_noop.noop.apply_async(task_id=task_id)
        _wait_sync(redis, [f"celery-task-meta-{i}" for i in ids])
        return jobs / (time.perf_counter() - started)
    finally:
        redis.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side, the sides alternating")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {"gputorrent": [], "celery": []}
    with EmbeddedRedis() as redis, Processes() as procs:
        pool = start_pool(procs, redis.url)
        pool.add_worker(["--backend", "fake", "--slots", str(WORKER_SLOTS)])
        pool.wait_for_workers(1)
        worker_id = pool.workers_alive()[0]["worker_id"]
        celery_url = f"{redis.url}/{CELERY_DB}"
        os.environ["BENCH_CELERY_REDIS"] = celery_url  # read by celery_noop, here and in its worker
        command = [sys.executable, "-m", "celery", "-A", "celery_noop", "worker", "--loglevel", "WARNING"]
        procs.start(command, cwd=HERE, stdout=subprocess.DEVNULL)  # its start-up banner
        asyncio.run(ours(redis.url, worker_id, 100))  # warm both sides (the Celery one also waits for its worker)
        celery(celery_url, 100)
        for _ in range(args.rounds):
            samples["gputorrent"].append(asyncio.run(ours(redis.url, worker_id, args.jobs)))
            samples["celery"].append(celery(celery_url, args.jobs))
            print(f"GPU Torrent {samples['gputorrent'][-1]:.0f}/s, Celery {samples['celery'][-1]:.0f}/s", flush=True)
    result: dict[str, Any] = {
        "jobs_per_round": args.jobs, "rounds": args.rounds, "worker_slots": WORKER_SLOTS,
        "celery_version": version("celery"), "samples": samples,
        "median": {side: statistics.median(values) for side, values in samples.items()},
    }  # fmt: skip
    result["ours_over_celery"] = result["median"]["gputorrent"] / result["median"]["celery"]
    write_result("dispatch", result)
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = ["| queue | jobs/s, median of rounds | every round (jobs/s) |", "|---|---|---|"]
    for side, label in (("gputorrent", "GPU Torrent"), ("celery", f"Celery {result['celery_version']}")):
        every = ", ".join(f"{v:.0f}" for v in result["samples"][side])
        rows.append(f"| {label} | {result['median'][side]:.0f} | {every} |")
    rows.append(
        f"\nGPU Torrent ÷ Celery: {result['ours_over_celery']:.2f} ({result['jobs_per_round']} jobs a round, "
        f"{result['rounds']} rounds a side)."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["GPU Torrent", "Celery"]
    medians = [result["median"]["gputorrent"], result["median"]["celery"]]
    ax.bar(labels, medians, color=["C0", "C1"])
    for x, side in enumerate(("gputorrent", "celery")):
        ax.plot([x] * len(result["samples"][side]), result["samples"][side], "k.", label=None)
    ax.set_ylabel("no-op jobs per second")
    ax.set_title("B3 dispatch: one worker, the same Redis (dots: rounds)")
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
