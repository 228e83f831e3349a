"""B2, throughput: the most requests per second with p99 added latency under 10 ms, GPU Torrent against LiteLLM.

One run starts the fast OpenAI-compatible server (bench/fast_openai_server.py, which answers at
once), a private Redis-compatible server, a coordinator with authentication on and one
`openai`-backend worker in front of the fast server, and LiteLLM's proxy (with a master key) in
front of the same server, all on this machine's cores together with the load generator. It then
offers open-loop (Poisson) load at rising rates; at each rate it runs the direct path, GPU Torrent
and LiteLLM one after another for a few seconds each (at least 100 requests), so every step has
its own direct baseline. A path keeps up at a rate when no request failed and it served at least
90% of the offered rate; its added p99 there is its p99 minus the direct p99 at that rate. Its
figure is the most requests per second served in a step that kept up with an added p99 under
10 ms (the knee); its peak is the most served in any step that kept up, whatever the latency. A
path stops stepping after two steps in a row that did not keep up.

    bench/.venv/bin/python bench/throughput.py --step-seconds 3

Prints a Markdown table and writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
from pool import (
    LITELLM_MASTER_KEY,
    PeerFailed,
    Processes,
    litellm_missing,
    save_plot,
    start_fast_server,
    start_litellm,
    start_pool,
    summary,
    version,
    write_result,
)

from gputorrent.embedded import EmbeddedRedis

RATES = (10, 25, 50, 100, 150, 200, 300, 400, 600, 800, 1200)
MIN_REQUESTS = 100  # per step, so its p99 is not just its slowest request
ADDED_P99_LIMIT_MS = 10.0
SERVED_FRACTION = 0.9
WORKER_SLOTS = 64  # jobs the worker runs at once: the fast server, like vLLM, serves any number together
# Ours runs as two processes (coordinator and worker); LiteLLM gets as many, so both may use both cores.
LITELLM_WORKERS = 2
BODY = {"model": "fast", "messages": [{"role": "user", "content": "go"}], "max_tokens": 16}
LABELS = {"direct": "direct", "gputorrent": "GPU Torrent", "litellm": "LiteLLM proxy"}


async def _one(http: aiohttp.ClientSession, url: str, headers: dict[str, str], at: float) -> tuple[float, float] | None:
    """(latency ms, finish time) of one request sent at `at`, or None when it failed."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    started = time.perf_counter()
    try:
        async with http.post(url, json=BODY, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                return None
    except (aiohttp.ClientError, TimeoutError):
        return None
    finished = time.perf_counter()
    return (finished - started) * 1000, finished


async def _step(http: aiohttp.ClientSession, url: str, headers: dict[str, str], rate: float, seconds: float) -> dict:
    rng = random.Random(int(rate))  # the same arrivals for every path at this rate
    seconds = max(seconds, MIN_REQUESTS / rate)
    arrivals, at = [], 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        arrivals.append(at)
    start = time.perf_counter() + 0.05
    done = await asyncio.gather(*(_one(http, url, headers, start + a) for a in arrivals))
    served = [d for d in done if d is not None]
    step: dict[str, Any] = {"offered_per_s": rate, "requests": len(arrivals), "errors": len(arrivals) - len(served)}
    if served:
        step["served_per_s"] = len(served) / (max(f for _, f in served) - start)
        step |= summary([latency for latency, _ in served])
    return step


async def measure(sides: dict[str, tuple[str, dict[str, str]]], rates: list[float], seconds: float) -> dict:
    steps: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    failures = dict.fromkeys(sides, 0)
    timeout = aiohttp.ClientTimeout(total=5)  # an overloaded path fails its step, not the run
    sessions = {
        side: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512), timeout=timeout) for side in sides
    }
    try:
        for side, (url, headers) in sides.items():  # warm every path
            for _ in range(20):
                await _one(sessions[side], url, headers, 0)
        for rate in rates:
            active = [side for side in sides if side == "direct" or failures[side] < 2]
            if active == ["direct"]:
                break
            for side in active:
                url, headers = sides[side]
                step = await _step(sessions[side], url, headers, rate, seconds)
                steps[side].append(step)
            for side in active:
                step = steps[side][-1]
                direct = steps["direct"][-1]
                step["added_p99"] = step.get("p99", float("inf")) - direct.get("p99", 0.0)
                step["kept_up"] = step["errors"] == 0 and step.get("served_per_s", 0) >= SERVED_FRACTION * rate
                step["passed"] = step["kept_up"] and step["added_p99"] < ADDED_P99_LIMIT_MS
                failures[side] = 0 if step["kept_up"] else failures[side] + 1
            print(
                f"{rate}/s: "
                + ", ".join(
                    f"{s} {steps[s][-1].get('served_per_s', 0):.0f}/s p99 {steps[s][-1].get('p99', 0):.1f} ms"
                    for s in active
                ),
                flush=True,
            )
    finally:
        for session in sessions.values():
            await session.close()
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-seconds", type=float, default=3.0, help="length of each path's run at each rate")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="offered rates, requests per second")
    parser.add_argument("--no-litellm", action="store_true", help="measure GPU Torrent against direct only")
    args = parser.parse_args()

    litellm_skipped = "--no-litellm" if args.no_litellm else litellm_missing()
    rates = [float(r) for r in args.rates.split(",")]
    with EmbeddedRedis() as redis, Processes() as procs:
        fast = start_fast_server(procs)
        pool = start_pool(procs, redis.url)
        worker = ["--backend", "openai", "--openai-base-url", fast, "--model", "fast", "--slots", str(WORKER_SLOTS)]
        pool.add_worker(worker)
        sides = {
            "direct": (f"{fast}/chat/completions", {}),
            "gputorrent": (f"{pool.url}/v1/chat/completions", pool.headers),
        }
        if not litellm_skipped:
            try:
                litellm = start_litellm(procs, fast, workers=LITELLM_WORKERS)
            except PeerFailed as e:
                litellm_skipped = str(e)
            else:
                litellm_headers = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
                sides["litellm"] = (f"{litellm}/v1/chat/completions", litellm_headers)
        pool.wait_for_model("fast")
        steps = asyncio.run(measure(sides, rates, args.step_seconds))
    result: dict[str, Any] = {
        "step_seconds": args.step_seconds, "added_p99_limit_ms": ADDED_P99_LIMIT_MS,
        "served_fraction": SERVED_FRACTION, "worker_slots": WORKER_SLOTS,
        "litellm_workers": LITELLM_WORKERS, "litellm_version": version("litellm"),
        "steps": steps, "knee": {}, "peak": {},
    }  # fmt: skip
    for side, side_steps in steps.items():
        for figure, key in (("knee", "passed"), ("peak", "kept_up")):
            chosen = [s for s in side_steps if s[key]]
            result[figure][side] = max(chosen, key=lambda s: s["served_per_s"]) if chosen else None
    for figure in ("knee", "peak"):
        ours, theirs = result[figure].get("gputorrent"), result[figure].get("litellm")
        if ours and theirs:
            result[f"ours_over_litellm_{figure}"] = ours["served_per_s"] / theirs["served_per_s"]
    if litellm_skipped:
        result["litellm_skipped"] = litellm_skipped
    write_result("throughput", result)
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| path | most requests/s with added p99 < 10 ms | peak requests/s kept up | p50 / p99 at the peak (ms) |"
        " added p99 at the peak (ms) |",
        "|---|---|---|---|---|",
    ]
    for side in result["peak"]:
        if side == "direct":
            continue
        knee, peak = result["knee"][side], result["peak"][side]
        knee_text = f"{knee['served_per_s']:.0f}" if knee else "none"
        if peak is None:
            rows.append(f"| {LABELS[side]} | {knee_text} | none | — | — |")
            continue
        rows.append(
            f"| {LABELS[side]} | {knee_text} | {peak['served_per_s']:.0f} | {peak['p50']:.1f} / {peak['p99']:.1f} "
            f"| {peak['added_p99']:+.1f} |"
        )
    ratios = [
        f"{label} {result[key]:.2f}"
        for key, label in (("ours_over_litellm_knee", "at the knee"), ("ours_over_litellm_peak", "at the peak"))
        if key in result
    ]
    if ratios:
        rows.append(
            f"\nGPU Torrent ÷ LiteLLM: {', '.join(ratios)} (LiteLLM {result['litellm_version']} with "
            f"{result['litellm_workers']} processes; at least {result['step_seconds']:.0f} s a step)."
        )
    if "litellm_skipped" in result:
        rows.append(f"\nLiteLLM not measured: {' '.join(result['litellm_skipped'].split())[:400]}.")
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, (side, side_steps) in enumerate(result["steps"].items()):
        if side == "direct":
            continue
        offered = [s["offered_per_s"] for s in side_steps]
        added = [max(s["added_p99"], 0.01) if s.get("p99") else float("nan") for s in side_steps]
        ax.plot(offered, added, color=f"C{i - 1}", label=LABELS[side])
        missed = [(x, y) for x, y, s in zip(offered, added, side_steps, strict=True) if not s["kept_up"]]
        ax.scatter([x for x, _ in missed], [y for _, y in missed], color=f"C{i - 1}", marker="x")
        kept = [(x, y) for x, y, s in zip(offered, added, side_steps, strict=True) if s["kept_up"]]
        ax.scatter([x for x, _ in kept], [y for _, y in kept], color=f"C{i - 1}", marker="o")
    ax.axhline(ADDED_P99_LIMIT_MS, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    rates = sorted({s["offered_per_s"] for side_steps in result["steps"].values() for s in side_steps})
    ax.set_xticks(rates, [f"{r:.0f}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("offered requests per second (log; x: did not keep up)")
    ax.set_ylabel("p99 added over direct (ms, log)")
    ax.set_title("B2 throughput: added p99 as load rises (dotted: 10 ms)")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
