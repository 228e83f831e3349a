"""B4, routing quality: latency per routing policy for a pool of workers of different speeds at 80% load.

One run starts a private Redis-compatible server and four worker processes on the `fake` test
backend, each pacing its tokens at a set delay (`GPUTORRENT_FAKE_TOKEN_DELAY_S`), so the workers
run at fixed, different speeds (two fast, one slower, one slowest) without a model. For each
policy it starts a coordinator with `GPUTORRENT_ROUTING` set to it and replays the same seeded
open-loop (Poisson) arrival schedule at 80% of the pool's capacity, measuring each request from
submission to result. Policies run one after another against the same workers, so every figure is
compared with round-robin's measured in the same run.

    .venv/bin/python bench/routing_quality.py --seconds 20

Prints a Markdown table and writes bench/results/routing_quality.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
from pool import Processes, save_plot, start_pool, summary, write_result

from gputorrent.embedded import EmbeddedRedis

POLICIES = ("round_robin", "least_loaded", "session_affinity", "pull")
TOKEN_DELAYS_S = (0.005, 0.005, 0.020, 0.040)  # per worker: two fast, one 4x slower, one 8x slower
LOAD = 0.8
SESSIONS = 64  # distinct session ids the requests carry (what session affinity keeps together)


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    s = summary(latencies_ms)
    return {"p50_ms": s["p50"], "p99_ms": s["p99"], "mean_ms": s["mean"], "max_ms": s["max"]}


async def _one(http: aiohttp.ClientSession, url: str, body: dict[str, object], at: float) -> float:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    started = time.perf_counter()
    async with http.post(f"{url}/inference", json=body) as resp:
        assert resp.status == 202, await resp.text()
        request_id = (await resp.json())["request_id"]
    while True:
        async with http.get(f"{url}/result/{request_id}", params={"wait": "30"}) as resp:
            if resp.status == 200:
                result = await resp.json()
                assert result["status"] == "completed", result
                return (time.perf_counter() - started) * 1000
            assert resp.status == 202, await resp.text()


async def _run_schedule(
    url: str, schedule: list[tuple[float, dict[str, object]]], headers: dict[str, str]
) -> list[float]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as http:
        start = time.perf_counter() + 0.2
        return list(await asyncio.gather(*(_one(http, url, body, start + at) for at, body in schedule)))


def _schedule(seconds: float, rate_per_s: float, tokens: int, seed: int) -> list[tuple[float, dict[str, object]]]:
    """Poisson arrivals; each request asks for `tokens` tokens (the echo of a prompt that long)."""
    rng = random.Random(seed)
    at, schedule = 0.0, []
    while at < seconds:
        at += rng.expovariate(rate_per_s)
        session = rng.randrange(SESSIONS)
        prompt = " ".join(f"s{session}w{i}" for i in range(tokens))
        body = {"model": "fake", "prompt": prompt, "options": {"max_tokens": tokens}, "session_id": f"s{session}"}
        schedule.append((at, body))
    return schedule


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each policy's arrival schedule")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per request")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()

    # Tokens are echoed words: a job of N tokens takes about N token delays on a worker.
    capacity_per_s = sum(1 / (args.tokens * delay_s) for delay_s in TOKEN_DELAYS_S)
    rate_per_s = LOAD * capacity_per_s
    schedule = _schedule(args.seconds, rate_per_s, args.tokens, args.seed)
    warmup = _schedule(2.0, rate_per_s / 2, args.tokens, args.seed + 1)
    results: dict[str, Any] = {
        "token_delays_s": TOKEN_DELAYS_S, "tokens_per_request": args.tokens, "load": LOAD,
        "capacity_jobs_per_s": capacity_per_s, "arrival_rate_per_s": rate_per_s, "requests": len(schedule),
        "policies": {},
    }  # fmt: skip
    with EmbeddedRedis() as redis, Processes() as procs:
        pool = start_pool(procs, redis.url)
        for i, delay_s in enumerate(TOKEN_DELAYS_S):
            env = {"GPUTORRENT_FAKE_TOKEN_DELAY_S": str(delay_s), "GPUTORRENT_WORKER_ID": f"w{i}"}
            pool.add_worker(["--backend", "fake"], env)
        pool.wait_for_workers(len(TOKEN_DELAYS_S))
        for policy in args.policies.split(","):
            # One coordinator per policy, against the same workers (they stay registered in Redis).
            pool.restart_coordinator({"GPUTORRENT_ROUTING": policy})
            asyncio.run(_run_schedule(pool.url, warmup, pool.headers))
            latencies = asyncio.run(_run_schedule(pool.url, schedule, pool.headers))
            figures = _summary(latencies)
            results["policies"][policy] = figures
            print(f"{policy}: p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms", flush=True)
    policies = results["policies"]
    if "round_robin" in policies:
        base = policies["round_robin"]
        for figures in policies.values():
            figures["p50_vs_round_robin"] = base["p50_ms"] / figures["p50_ms"]
            figures["p99_vs_round_robin"] = base["p99_ms"] / figures["p99_ms"]
    write_result("routing_quality", results)
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| policy | p50 (ms) | p99 (ms) | p50: round-robin ÷ policy | p99: round-robin ÷ policy |",
        "|---|---|---|---|---|",
    ]
    policies = results["policies"]
    for policy, s in policies.items():
        ratios = f"{s.get('p50_vs_round_robin', 0):.2f} | {s.get('p99_vs_round_robin', 0):.2f}"
        rows.append(f"| `{policy}` | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {ratios} |")
    return "\n".join(rows)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    policies = results["policies"]
    names = list(policies)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [policies[n]["p50_ms"] for n in names], width, label="p50")
    ax.bar([x + width / 2 for x in xs], [policies[n]["p99_ms"] for n in names], width, label="p99")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("submit to result (ms, log)")
    ax.set_title(f"B4 routing quality: workers of 4 speeds at {results['load']:.0%} load")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
