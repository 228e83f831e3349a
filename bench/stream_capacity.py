"""B6, streaming capacity: the most concurrent token streams one coordinator carries, against LiteLLM.

One run starts the fast OpenAI-compatible server (bench/fast_openai_server.py) pacing every reply
at a steady rate (20 tokens a second by default), a private Redis-compatible server, one
coordinator process with authentication on and one `openai`-backend worker in front of the fast
server, and LiteLLM's proxy (one process, a master key) in front of the same server, all on this
machine's cores together with the load generator.

At each level N it opens N streamed chat completions on each side in turn (straight from the fast
server, through GPU Torrent, through LiteLLM): the starts are spread over a ramp (at most
`--starts-per-s` a second, so admission is not what is measured), then all N stream together for a
hold window. Every gap between two tokens that arrives in the hold window counts; the added p99
gap is a side's p99 minus the direct side's p99 at the same level. A side carries N streams when
every one of them was open before the hold window, completed with exactly the expected tokens
(none lost, none repeated: token i is `t{i} `) and its added p99 gap stayed under 50 ms. A side
stops after two levels in a row that it did not carry; the run stops where the direct side itself
misses the mark (the load generator and the fast server then are the limit, not the paths).

CPU per relayed token is each process's CPU time over the side's step (coordinator, worker,
Redis's own `used_cpu_*`; LiteLLM's process and its children) divided by the tokens the clients
received in that step, the N admissions included.

    bench/.venv/bin/python bench/stream_capacity.py

Prints a Markdown table and writes bench/results/stream_capacity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import math
import time
from collections.abc import Callable
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
    start_fast_server,
    start_litellm,
    start_pool,
    summary,
    version,
    write_result,
)

from gputorrent.embedded import EmbeddedRedis

LEVELS = (25, 50, 75, 100, 150, 200, 250, 300, 400, 600, 800)
ADDED_GAP_P99_LIMIT_MS = 50.0
HOLD_S = 3.0  # every stream open together this long
WARM_STREAMS = 10  # a step of this many on each side before the levels, not counted
GRACE_S = 1.0  # after the last start, for its first token, before the hold window
WORKER_SLOTS = 1024  # the most a worker takes; the fast server, like vLLM, serves any number together
LABELS = {"direct": "direct", "gputorrent": "GPU Torrent", "litellm": "LiteLLM proxy"}


class Stream:
    """One streamed chat completion: when its tokens arrived and what they said."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.arrivals: list[float] = []
        self.text: list[str] = []
        self.error: str | None = None

    @property
    def exact(self) -> bool:
        return self.error is None and "".join(self.text) == "".join(f"t{i} " for i in range(self.tokens))


async def _stream(http: aiohttp.ClientSession, url: str, headers: dict[str, str], at: float, stream: Stream) -> None:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    body = {"model": "fast", "messages": [{"role": "user", "content": "go"}], "max_tokens": stream.tokens}
    try:
        async with http.post(url, json={**body, "stream": True}, headers=headers) as resp:
            if resp.status != 200:
                stream.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                for choice in json.loads(line[5:]).get("choices", []):
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        stream.arrivals.append(time.perf_counter())
                        stream.text.append(content)
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        stream.error = f"{type(e).__name__}: {e}"


async def step(
    url: str, headers: dict[str, str], level: int, pace_s: float, starts_per_s: float
) -> tuple[list[Stream], float, float]:
    """N streams of one side; (the streams, the hold window's start and end)."""
    ramp_s = level / starts_per_s
    begin = time.perf_counter() + 0.2
    hold_start = begin + ramp_s + GRACE_S
    hold_end = hold_start + HOLD_S
    starts = [begin + i * ramp_s / level for i in range(level)]
    # Each stream lasts past the hold window by a few tokens, whenever it started.
    streams = [Stream(math.ceil((hold_end - at) / pace_s) + 3) for at in starts]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(_stream(http, url, headers, at, s) for at, s in zip(starts, streams, strict=True)))
    return streams, hold_start, hold_end


def judge(streams: list[Stream], hold_start: float, hold_end: float) -> dict[str, Any]:
    gaps = [(b - a) * 1000 for s in streams for a, b in itertools.pairwise(s.arrivals) if hold_start <= b <= hold_end]
    late = sum(1 for s in streams if not s.arrivals or s.arrivals[0] > hold_start)
    failed = [s.error for s in streams if s.error]
    return {
        "streams": len(streams),
        "inexact": sum(1 for s in streams if not s.exact),
        "failed": len(failed),
        "first_error": failed[0] if failed else None,
        "not_open_in_time": late,
        "tokens": sum(len(s.text) for s in streams),
        "gap": summary(gaps) if gaps else None,
    }


def measure(
    sides: dict[str, tuple[str, dict[str, str]]],
    accounted: dict[str, dict[str, Callable[[], float]]],
    levels: list[int],
    pace_s: float,
    starts_per_s: float,
) -> dict[str, list[dict[str, Any]]]:
    steps: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    misses = dict.fromkeys(sides, 0)
    for url, headers in sides.values():  # warm every path (connections, lazy imports, first requests)
        asyncio.run(step(url, headers, WARM_STREAMS, pace_s, starts_per_s))
    for level in levels:
        direct_p99 = None
        for side, (url, headers) in sides.items():
            if misses[side] >= 2:
                continue
            parts = accounted.get(side, {})
            before = {name: cpu_s() for name, cpu_s in parts.items()}
            streams, hold_start, hold_end = asyncio.run(step(url, headers, level, pace_s, starts_per_s))
            after = {name: cpu_s() for name, cpu_s in parts.items()}
            result = {"level": level, **judge(streams, hold_start, hold_end)}
            if result["tokens"]:
                result["cpu_us_per_token"] = {n: (after[n] - before[n]) * 1e6 / result["tokens"] for n in parts}
            gap_p99 = result["gap"]["p99"] if result["gap"] else math.inf
            if side == "direct":  # judged against the pace itself; the others against it
                direct_p99 = gap_p99
            reference = pace_s * 1000 if side == "direct" or direct_p99 is None else direct_p99
            result["added_gap_p99"] = gap_p99 - reference
            result["carried"] = (
                result["failed"] == 0
                and result["inexact"] == 0
                and result["not_open_in_time"] == 0
                and result["added_gap_p99"] < ADDED_GAP_P99_LIMIT_MS
            )
            steps[side].append(result)
            misses[side] = 0 if result["carried"] else misses[side] + 1
            gap_text = f"gap p99 {gap_p99:.1f} ms" if result["gap"] else "no gaps"
            print(
                f"{side:>10} {level:5d} streams: {gap_text}, added {result['added_gap_p99']:+.1f}, "
                f"failed {result['failed']}, inexact {result['inexact']}, late {result['not_open_in_time']}, "
                f"carried {result['carried']}",
                flush=True,
            )
        if steps["direct"] and not steps["direct"][-1]["carried"]:
            break  # the load generator and the fast server are the limit from here
        if all(misses[side] >= 2 for side in sides if side != "direct"):
            break  # every path measured has found its limit
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent streams to try")
    parser.add_argument("--tokens-per-s", type=float, default=20.0, help="the fast server's pace, each stream")
    parser.add_argument("--starts-per-s", type=float, default=100.0, help="how fast the streams of a level open")
    parser.add_argument("--no-litellm", action="store_true", help="measure GPU Torrent against direct only")
    args = parser.parse_args()

    pace_s = 1 / args.tokens_per_s
    levels = [int(n) for n in args.levels.split(",")]
    litellm_skipped = "--no-litellm" if args.no_litellm else litellm_missing()
    with EmbeddedRedis() as embedded, Processes() as procs:
        fast = start_fast_server(procs, pace_s * 1000)
        # One coordinator process; the per-key stream limit off, so only capacity bounds the streams.
        pool = start_pool(procs, embedded.url, {"GPUTORRENT_MAX_STREAMS": "0"})
        worker = pool.add_worker(
            ["--backend", "openai", "--openai-base-url", fast, "--model", "fast", "--slots", str(WORKER_SLOTS)]
        )
        sides = {
            "direct": (f"{fast}/chat/completions", {}),
            "gputorrent": (f"{pool.url}/v1/chat/completions", pool.headers),
        }
        accounted = {
            "gputorrent": {
                "coordinator": functools.partial(process_cpu_s, pool.coordinator.pid),
                "worker": functools.partial(process_cpu_s, worker.pid),
                "redis": functools.partial(redis_cpu_s, embedded.url),
            }
        }
        if not litellm_skipped:
            try:
                litellm = start_litellm(procs, fast, workers=1)
            except PeerFailed as e:
                litellm_skipped = str(e)
            else:
                sides["litellm"] = (f"{litellm}/v1/chat/completions", {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"})
                accounted["litellm"] = {"proxy": functools.partial(process_cpu_s, procs.children[-1].pid)}
        pool.wait_for_model("fast")
        steps = measure(sides, accounted, levels, pace_s, args.starts_per_s)
    result: dict[str, Any] = {
        "tokens_per_s": args.tokens_per_s, "starts_per_s": args.starts_per_s, "hold_s": HOLD_S,
        "added_gap_p99_limit_ms": ADDED_GAP_P99_LIMIT_MS, "worker_slots": WORKER_SLOTS,
        "litellm_version": version("litellm"), "steps": steps, "capacity": {},
    }  # fmt: skip
    for side, side_steps in steps.items():
        carried = [s for s in side_steps if s["carried"]]
        result["capacity"][side] = max(carried, key=lambda s: s["level"]) if carried else None
    ours, theirs = result["capacity"].get("gputorrent"), result["capacity"].get("litellm")
    if ours and theirs:
        result["ours_over_litellm"] = ours["level"] / theirs["level"]
    if litellm_skipped:
        result["litellm_skipped"] = litellm_skipped
    write_result("stream_capacity", result)
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| path | most streams carried | gap p50 / p99 there (ms) | added p99 there (ms) "
        "| CPU per relayed token there (µs) |",
        "|---|---|---|---|---|",
    ]
    for side, best in result["capacity"].items():
        if best is None:
            rows.append(f"| {LABELS[side]} | none | — | — | — |")
            continue
        cpu = best.get("cpu_us_per_token") or {}
        cpu_text = ", ".join(f"{name} {us:.0f}" for name, us in cpu.items()) or "—"
        rows.append(
            f"| {LABELS[side]} | {best['level']} | {best['gap']['p50']:.1f} / {best['gap']['p99']:.1f} "
            f"| {best['added_gap_p99']:+.1f} | {cpu_text} |"
        )
    pace = 1000 / result["tokens_per_s"]
    rows.append(
        f"\nEach stream paced at {result['tokens_per_s']:.0f} tokens a second ({pace:.0f} ms a gap); a path carries N "
        f"streams when all N are open together for {result['hold_s']:.0f} s, every token arrives exactly once and in "
        f"order, and its p99 gap is within {result['added_gap_p99_limit_ms']:.0f} ms of the direct path's "
        "(the direct path: of the pace)."
    )
    if "ours_over_litellm" in result:
        rows.append(
            f"\nGPU Torrent ÷ LiteLLM: {result['ours_over_litellm']:.1f} times the streams "
            f"(one process each; LiteLLM {result['litellm_version']})."
        )
    if "litellm_skipped" in result:
        rows.append(f"\nLiteLLM not measured: {' '.join(result['litellm_skipped'].split())[:400]}.")
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, (side, side_steps) in enumerate(result["steps"].items()):
        levels = [s["level"] for s in side_steps]
        p99 = [s["gap"]["p99"] if s["gap"] else float("nan") for s in side_steps]
        ax.plot(levels, p99, color=f"C{i}", label=LABELS[side])
        missed = [(x, y) for x, y, s in zip(levels, p99, side_steps, strict=True) if not s["carried"]]
        ax.scatter([x for x, _ in missed], [y for _, y in missed], color=f"C{i}", marker="x")
    pace = 1000 / result["tokens_per_s"]
    ax.axhline(pace + result["added_gap_p99_limit_ms"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    levels = sorted({s["level"] for side_steps in result["steps"].values() for s in side_steps})
    ax.set_xticks(levels, [str(level) for level in levels], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("concurrent streams (log; x: not carried)")
    ax.set_ylabel("p99 gap between tokens (ms)")
    ax.set_title(f"B6 streaming capacity at {result['tokens_per_s']:.0f} tokens/s a stream")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
