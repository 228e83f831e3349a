"""Streaming overhead: time to first token and the gap between tokens, through GPU Torrent and direct.

One run starts the fast OpenAI-compatible server (bench/fast_openai_server.py), a private
Redis-compatible server, a coordinator and one `openai`-backend worker in front of it, and the
bare hops (bench/bare_relay.py: the same path with none of GPU Torrent's work, the floor on this
machine, raw and behind one FastAPI route), then streams the same chat completion from each in turn
(straight from the fast server, through the coordinator's `/v1/chat/completions`, through the two
bare relays), so every side sees the same machine noise.

    .venv/bin/python bench/stream_latency.py --requests 200 --tokens 32 --gap-ms 5

Prints a Markdown table and writes bench/results/stream_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from pool import Processes, save_plot, start_bare_relay, start_fast_server, start_pool, summary, write_result

from gputorrent.embedded import EmbeddedRedis


async def stream_once(
    http: aiohttp.ClientSession, url: str, model: str, tokens: int, headers: dict[str, str]
) -> tuple[float, list[float], str]:
    """(time to first token, gaps between tokens, text) of one streamed chat completion, in ms."""
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": tokens, "stream": True}
    started = time.perf_counter()
    arrivals: list[float] = []
    text = []
    async with http.post(url, json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    arrivals.append((time.perf_counter() - started) * 1000)
                    text.append(content)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0], gaps, "".join(text)


async def measure(sides: dict[str, tuple[str, dict[str, str]]], requests: int, tokens: int) -> dict[str, object]:
    """Stream from each side in turn (`direct` first), `requests` times each."""
    expected = "".join(f"t{i} " for i in range(tokens))
    samples: dict[str, dict[str, list[float]]] = {side: {"ttft": [], "gap": []} for side in sides}
    wrong = dict.fromkeys(sides, 0)
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # warm every path (connections, imports, caches)
            for url, headers in sides.values():
                await stream_once(http, url, "fast", tokens, headers)
        for _ in range(requests):
            for side, (url, headers) in sides.items():
                ttft, gaps, text = await stream_once(http, url, "fast", tokens, headers)
                samples[side]["ttft"].append(ttft)
                samples[side]["gap"].extend(gaps)
                wrong[side] += text != expected
    result: dict[str, object] = {"requests_per_side": requests, "tokens_per_request": tokens, "wrong_text": wrong}
    for metric in ("ttft", "gap"):
        figures = {side: summary(samples[side][metric]) for side in sides}
        for side in ("pool", "bare", "bare_fastapi"):
            figures[side]["added_p50_ms"] = figures[side]["p50"] - figures["direct"]["p50"]
        result[metric] = figures
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="streams per side")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="the fast server's pause between tokens")
    args = parser.parse_args()

    with EmbeddedRedis() as redis, Processes() as procs:
        fast = start_fast_server(procs, args.gap_ms)
        pool = start_pool(procs, redis.url)
        pool.add_worker(["--backend", "openai", "--openai-base-url", fast, "--model", "fast"])
        pool.wait_for_model("fast")
        sides = {
            "direct": (f"{fast}/chat/completions", {}),
            "pool": (f"{pool.url}/v1/chat/completions", pool.headers),
            "bare": (f"{start_bare_relay(procs, redis.url, fast).url}/chat/completions", {}),
            "bare_fastapi": (f"{start_bare_relay(procs, redis.url, fast, on_fastapi=True).url}/chat/completions", {}),
        }
        result = asyncio.run(measure(sides, args.requests, args.tokens))
    result["gap_ms_configured"] = args.gap_ms
    write_result("stream_latency", result)
    print(table(result))
    return 0


LABELS = {
    "direct": "direct",
    "pool": "through GPU Torrent",
    "bare": "through the bare hops",
    "bare_fastapi": "through the bare hops on FastAPI",
}


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| path | first token p50 (ms) | added | first token p99 | gap between tokens p50 (ms) | added | gap p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, label in LABELS.items():
        ttft, gap = result["ttft"][side], result["gap"][side]
        if side == "direct":
            added_ttft = added_gap = "—"
        else:
            added_ttft, added_gap = f"{ttft['added_p50_ms']:+.2f}", f"{gap['added_p50_ms']:+.2f}"
        rows.append(
            f"| {label} | {ttft['p50']:.2f} | {added_ttft} | {ttft['p99']:.2f} | {gap['p50']:.2f} | {added_gap} "
            f"| {gap['p99']:.2f} |"
        )
    wrong, n = result["wrong_text"], result["requests_per_side"]
    rows.append(
        f"\nStreams whose text differed from the expected tokens, of {n} a path: "
        + ", ".join(f"{wrong[side]} {label}" for side, label in LABELS.items())
        + "."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["first token p50", "first token p99", "gap p50", "gap p99"]
    keys = [("ttft", "p50"), ("ttft", "p99"), ("gap", "p50"), ("gap", "p99")]
    xs = range(len(labels))
    width = 0.2
    for i, (side, label) in enumerate(LABELS.items()):
        offset = (i - (len(LABELS) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [result[m][side][q] for m, q in keys], width, label=label)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms")
    ax.set_title("Streaming: time to first token and gap between tokens")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
