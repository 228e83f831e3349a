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
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

from gputorrent.embedded import EmbeddedRedis, free_port

HERE = Path(__file__).parent
POLICIES = ("round_robin", "least_loaded", "session_affinity", "pull")
TOKEN_DELAYS_S = (0.005, 0.005, 0.020, 0.040)  # per worker: two fast, one 4x slower, one 8x slower
LOAD = 0.8
SESSIONS = 64  # distinct session ids the requests carry (what session affinity keeps together)


def _wait(condition: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if callable(condition) and condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "gputorrent", "--log-level", "warning", *args]
    return subprocess.Popen(command, env={**os.environ, **env})


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean_ms": statistics.fmean(ordered),
        "max_ms": ordered[-1],
    }


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


async def _run_schedule(url: str, schedule: list[tuple[float, dict[str, object]]]) -> list[float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
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
    base_env = {"GPUTORRENT_AUTH": "off"}
    results: dict[str, object] = {
        "token_delays_s": TOKEN_DELAYS_S, "tokens_per_request": args.tokens, "load": LOAD,
        "capacity_jobs_per_s": capacity_per_s, "arrival_rate_per_s": rate_per_s, "requests": len(schedule),
        "policies": {},
    }  # fmt: skip
    workers: list[subprocess.Popen[bytes]] = []
    with EmbeddedRedis() as redis:
        try:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            first = _spawn(["coordinator", "--port", str(port), "--redis-url", redis.url], base_env)
            _wait(lambda: httpx.get(f"{url}/health").status_code == 200, "the coordinator")
            for i, delay_s in enumerate(TOKEN_DELAYS_S):
                env = {**base_env, "GPUTORRENT_FAKE_TOKEN_DELAY_S": str(delay_s), "GPUTORRENT_WORKER_ID": f"w{i}"}
                args_ = ["worker", "--backend", "fake", "--coordinator", url, "--redis-url", redis.url]
                workers.append(_spawn(args_, env))
            _wait(lambda: sum(w["state"] == "alive" for w in httpx.get(f"{url}/workers").json()) == 4, "4 workers")
            first.terminate()
            first.wait(timeout=15)
            for policy in args.policies.split(","):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                env = {**base_env, "GPUTORRENT_ROUTING": policy}
                coordinator = _spawn(["coordinator", "--port", str(port), "--redis-url", redis.url], env)
                try:
                    _wait(lambda: httpx.get(f"{url}/health").status_code == 200, "the coordinator")  # noqa: B023
                    asyncio.run(_run_schedule(url, warmup))
                    latencies = asyncio.run(_run_schedule(url, schedule))
                finally:
                    coordinator.terminate()
                    coordinator.wait(timeout=15)
                summary = _summary(latencies)
                results["policies"][policy] = summary  # type: ignore[index]
                print(f"{policy}: p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms", flush=True)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)
    policies = results["policies"]
    assert isinstance(policies, dict)
    if "round_robin" in policies:
        base = policies["round_robin"]
        for summary in policies.values():
            summary["p50_vs_round_robin"] = base["p50_ms"] / summary["p50_ms"]
            summary["p99_vs_round_robin"] = base["p99_ms"] / summary["p99_ms"]
    out = HERE / "results" / "routing_quality.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def table(results: dict[str, object]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| policy | p50 (ms) | p99 (ms) | p50: round-robin ÷ policy | p99: round-robin ÷ policy |",
        "|---|---|---|---|---|",
    ]
    policies = results["policies"]
    assert isinstance(policies, dict)
    for policy, s in policies.items():
        ratios = f"{s.get('p50_vs_round_robin', 0):.2f} | {s.get('p99_vs_round_robin', 0):.2f}"
        rows.append(f"| `{policy}` | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {ratios} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
