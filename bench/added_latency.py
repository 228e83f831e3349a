"""B1, added latency: a non-streamed chat completion at concurrency 1, direct, through GPU Torrent and through LiteLLM.

One run starts the fast OpenAI-compatible server (bench/fast_openai_server.py, which answers at
once), a private Redis-compatible server, a coordinator with authentication on and one
`openai`-backend worker in front of the fast server, the bare hops (bench/bare_relay.py: the same
path with none of GPU Torrent's work, the floor on this machine, raw and behind one FastAPI route)
and LiteLLM's proxy (with a master key) in front of the same server. It then sends the same chat
completion to each in turn, request by request (direct, GPU Torrent, bare hops, bare hops on
FastAPI, LiteLLM, direct, ...), one at a time on one kept-alive connection each, so every side sees
the same machine noise. The added latency of a path is its percentile minus the direct percentile.

Then it measures CPU per request: GPU Torrent alone, then the bare hops alone (raw), each for
`--cpu-requests` requests one at a time and as many again 8 at once, reading the CPU time of the
coordinator (or relay), the worker (or bare worker) and Redis (its INFO's used_cpu_*) before and
after each phase.

    bench/.venv/bin/python bench/added_latency.py --requests 1000

Prints a Markdown table and writes bench/results/added_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from pool import (
    LITELLM_MASTER_KEY,
    PeerFailed,
    Processes,
    litellm_missing,
    process_cpu_s,
    redis_cpu_s,
    save_plot,
    start_bare_relay,
    start_fast_server,
    start_litellm,
    start_pool,
    summary,
    version,
    write_result,
)

from gputorrent.embedded import EmbeddedRedis

TOKENS = 16
EXPECTED = "".join(f"t{i} " for i in range(TOKENS))
BODY = {"model": "fast", "messages": [{"role": "user", "content": "go"}], "max_tokens": TOKENS}
LABELS = {
    "direct": "direct",
    "gputorrent": "GPU Torrent",
    "bare": "bare hops",
    "bare_fastapi": "bare hops on FastAPI",
    "litellm": "LiteLLM proxy",
}


async def complete(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    """Milliseconds for one chat completion; raises unless the reply is the expected text."""
    started = time.perf_counter()
    async with http.post(url, json=BODY, headers=headers) as resp:
        reply = await resp.json()
    elapsed = (time.perf_counter() - started) * 1000
    if resp.status != 200 or reply["choices"][0]["message"]["content"] != EXPECTED:
        raise RuntimeError(f"{url} answered {resp.status}: {str(reply)[:300]}")
    return elapsed


async def measure(sides: dict[str, tuple[str, dict[str, str]]], requests: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {side: [] for side in sides}
    # One connection per side, kept alive, as a client library holds one.
    sessions = {side: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for side in sides}
    try:
        for _ in range(50):  # warm every path: connections, caches, lazy imports
            for side, (url, headers) in sides.items():
                await complete(sessions[side], url, headers)
        for _ in range(requests):
            for side, (url, headers) in sides.items():
                samples[side].append(await complete(sessions[side], url, headers))
    finally:
        for session in sessions.values():
            await session.close()
    return samples


CPU_CONCURRENCY = (1, 8)


async def load(url: str, headers: dict[str, str], requests: int, concurrency: int) -> None:
    """`requests` chat completions, `concurrency` at a time, each caller on a kept-alive connection."""
    remaining = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def caller() -> None:
            for _ in remaining:
                await complete(http, url, headers)

        await asyncio.gather(*(caller() for _ in range(concurrency)))


def cpu_per_request(
    url: str, headers: dict[str, str], front_pid: int, worker_pid: int, redis_url: str, requests: int
) -> dict[str, dict[str, float]]:
    """Milliseconds of CPU a request costs the front process, the worker and Redis, by concurrency."""
    figures: dict[str, dict[str, float]] = {}
    asyncio.run(load(url, headers, 200, 8))  # warm
    for concurrency in CPU_CONCURRENCY:
        before = (process_cpu_s(front_pid), process_cpu_s(worker_pid), redis_cpu_s(redis_url))
        asyncio.run(load(url, headers, requests, concurrency))
        after = (process_cpu_s(front_pid), process_cpu_s(worker_pid), redis_cpu_s(redis_url))
        front, worker, redis = ((b - a) * 1000 / requests for a, b in zip(before, after, strict=True))
        figures[str(concurrency)] = {"front": front, "worker": worker, "redis": redis}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per side")
    parser.add_argument("--cpu-requests", type=int, default=2000, help="requests per CPU phase")
    parser.add_argument("--no-litellm", action="store_true", help="measure GPU Torrent against direct only")
    args = parser.parse_args()

    litellm_skipped = "--no-litellm" if args.no_litellm else litellm_missing()
    with EmbeddedRedis() as redis, Processes() as procs:
        fast = start_fast_server(procs)
        pool = start_pool(procs, redis.url)
        # As many slots as the CPU phase's concurrency, so no request waits in the queue there.
        worker = pool.add_worker(
            ["--backend", "openai", "--openai-base-url", fast, "--model", "fast", "--slots", str(max(CPU_CONCURRENCY))]
        )
        bare = start_bare_relay(procs, redis.url, fast)
        sides = {
            "direct": (f"{fast}/chat/completions", {}),
            "gputorrent": (f"{pool.url}/v1/chat/completions", pool.headers),
            "bare": (f"{bare.url}/chat/completions", {}),
            "bare_fastapi": (f"{start_bare_relay(procs, redis.url, fast, on_fastapi=True).url}/chat/completions", {}),
        }
        if not litellm_skipped:
            try:
                litellm = start_litellm(procs, fast)
            except PeerFailed as e:
                litellm_skipped = str(e)
            else:
                litellm_headers = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
                sides["litellm"] = (f"{litellm}/v1/chat/completions", litellm_headers)
        pool.wait_for_model("fast")
        samples = asyncio.run(measure(sides, args.requests))
        ours_url, bare_url = sides["gputorrent"][0], sides["bare"][0]
        cpu = {
            "gputorrent": cpu_per_request(
                ours_url, pool.headers, pool.coordinator.pid, worker.pid, redis.url, args.cpu_requests
            ),
            "bare": cpu_per_request(bare_url, {}, bare.relay_pid, bare.worker_pid, redis.url, args.cpu_requests),
        }
    result = analyse(samples)
    result |= {"cpu_ms_per_request": cpu, "cpu_requests": args.cpu_requests}
    result |= {"requests_per_side": args.requests, "tokens": TOKENS, "litellm_version": version("litellm")}
    if litellm_skipped:
        result["litellm_skipped"] = litellm_skipped
    write_result("added_latency", result)
    print(table(result))
    return 0


def analyse(samples: dict[str, list[float]]) -> dict[str, Any]:
    sides = {side: summary(values) for side, values in samples.items()}
    direct = sides["direct"]
    for figures in sides.values():
        figures["added_p50"] = figures["p50"] - direct["p50"]
        figures["added_p99"] = figures["p99"] - direct["p99"]
    result: dict[str, Any] = {"sides": sides}
    if "litellm" in sides:
        ours, theirs = sides["gputorrent"], sides["litellm"]
        result["ours_over_litellm_added_p50"] = ours["added_p50"] / theirs["added_p50"]
        result["ours_over_litellm_added_p99"] = ours["added_p99"] / theirs["added_p99"]
    return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = ["| path | p50 (ms) | p99 (ms) | added p50 (ms) | added p99 (ms) |", "|---|---|---|---|---|"]
    for side, f in result["sides"].items():
        added = "— | —" if side == "direct" else f"{f['added_p50']:+.2f} | {f['added_p99']:+.2f}"
        rows.append(f"| {LABELS[side]} | {f['p50']:.2f} | {f['p99']:.2f} | {added} |")
    bare, on_fastapi, ours = (result["sides"][side]["added_p50"] for side in ("bare", "bare_fastapi", "gputorrent"))
    rows.append(
        f"\nAt p50 the bare hops add {bare:.2f} ms, FastAPI {on_fastapi - bare:.2f} ms more, and GPU Torrent's own "
        f"work {ours - on_fastapi:.2f} ms beyond that."
    )
    rows.append(cpu_table(result))
    if "ours_over_litellm_added_p50" in result:
        rows.append(
            f"\nGPU Torrent's added latency ÷ LiteLLM's: {result['ours_over_litellm_added_p50']:.2f} at p50, "
            f"{result['ours_over_litellm_added_p99']:.2f} at p99 ({result['requests_per_side']} requests a side, "
            f"LiteLLM {result['litellm_version']})."
        )
    else:
        rows.append(f"\nLiteLLM not measured: {' '.join(str(result.get('litellm_skipped')).split())[:400]}.")
    return "\n".join(rows)


def cpu_table(result: dict[str, Any]) -> str:
    """CPU per request: GPU Torrent's processes against the bare hops' (raw), with their ratios."""
    cpu = result.get("cpu_ms_per_request")
    if not cpu:
        return ""
    rows = [
        "\n| CPU per request (ms) | coordinator (bare: relay) | worker | Redis |",
        "|---|---|---|---|",
    ]
    for concurrency in map(str, CPU_CONCURRENCY):
        ours, bare = cpu["gputorrent"][concurrency], cpu["bare"][concurrency]
        at = "one at a time" if concurrency == "1" else f"{concurrency} at once"
        rows.append(f"| GPU Torrent, {at} | {ours['front']:.2f} | {ours['worker']:.2f} | {ours['redis']:.2f} |")
        rows.append(f"| bare hops, {at} | {bare['front']:.2f} | {bare['worker']:.2f} | {bare['redis']:.2f} |")
        ratios = " | ".join(f"{ours[part] / bare[part]:.1f} times" for part in ("front", "worker", "redis"))
        rows.append(f"| ratio, {at} | {ratios} |")
    rows.append(f"\n{result['cpu_requests']} requests a phase, each path alone.")
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    sides = [s for s in result["sides"] if s != "direct"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    xs = range(len(sides))
    ax.bar([x - width / 2 for x in xs], [result["sides"][s]["added_p50"] for s in sides], width, label="added p50")
    ax.bar([x + width / 2 for x in xs], [result["sides"][s]["added_p99"] for s in sides], width, label="added p99")
    ax.axhline(1.5, color="C0", linestyle=":", linewidth=1)
    ax.axhline(3.0, color="C1", linestyle=":", linewidth=1)
    ax.set_xticks(list(xs), [LABELS[s] for s in sides])
    ax.set_ylabel("ms added to a direct call")
    ax.set_title("B1 added latency at concurrency 1 (dotted: targets)")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
