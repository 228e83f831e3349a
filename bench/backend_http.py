"""The worker's call to its backend: bare aiohttp against the worker's client (aiohttp with its layer), call by call.

One run starts the fast OpenAI-compatible server (bench/fast_openai_server.py, which answers at
once) and sends it the same non-streamed chat completion (16 tokens) alternately through bare
aiohttp (`session.post` and reading the reply) and through the client the worker's backends use
(`HTTPClient.request_json`, gputorrent/worker/backends/_http.py: aiohttp, with the retry of a
kept-alive connection the server closed and the closing of a reply left early), each on its own
kept-alive connection, on uvloop as the worker runs, so both sides see the same machine noise.
What is between them is the cost of that layer. Every reply is checked against the expected text.

    .venv/bin/python bench/backend_http.py --calls 2000

Prints both sides' p50 and p99 and writes bench/results/backend_http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from pool import Processes, save_plot, start_fast_server, summary, write_result

from gputorrent.worker.backends._http import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, HTTPClient

TOKENS = 16
BODY = {"model": "fast", "messages": [{"role": "user", "content": "go"}], "max_tokens": TOKENS}
EXPECTED = "".join(f"t{i} " for i in range(TOKENS))


async def measure(base_url: str, calls: int) -> dict[str, list[float]]:
    """Milliseconds per call for each side, the sides alternating call by call."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    session = aiohttp.ClientSession(timeout=timeout)
    client = HTTPClient(base_url, server="the fast server")

    async def with_aiohttp() -> dict[str, Any]:
        async with session.post(f"{base_url}/chat/completions", json=BODY) as resp:
            text = await resp.text()
        reply: dict[str, Any] = json.loads(text)
        return reply

    async def with_worker_client() -> dict[str, Any]:
        return await client.request_json("POST", "/chat/completions", BODY)

    sides: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {"aiohttp": with_aiohttp, "worker": with_worker_client}
    samples: dict[str, list[float]] = {side: [] for side in sides}
    try:
        for _ in range(50):  # connections open, code paths warm
            for call in sides.values():
                await call()
        for i in range(calls * 2):
            side = "aiohttp" if i % 2 == 0 else "worker"
            started = time.perf_counter()
            reply = await sides[side]()
            samples[side].append((time.perf_counter() - started) * 1000)
            if reply["choices"][0]["message"]["content"] != EXPECTED:
                raise SystemExit(f"{side}: unexpected reply {reply}")
    finally:
        await session.close()
        await client.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per side")
    args = parser.parse_args()

    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with Processes() as procs:
        base_url = start_fast_server(procs)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            samples = runner.run(measure(base_url, args.calls))
    result: dict[str, Any] = {side: summary(values) for side, values in samples.items()}
    result |= {"calls_per_side": args.calls, "uvloop": loop_factory is not None}
    result["worker_over_aiohttp"] = {q: result["worker"][q] / result["aiohttp"][q] for q in ("p50", "p99")}
    write_result("backend_http", result)
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = ["| client | p50 (µs) | p99 (µs) |", "|---|---|---|"]
    for side, label in (("aiohttp", "bare aiohttp"), ("worker", "the worker's client")):
        rows.append(f"| {label} | {result[side]['p50'] * 1000:.0f} | {result[side]['p99'] * 1000:.0f} |")
    ratio = result["worker_over_aiohttp"]
    rows.append(
        f"\nThe worker's client ÷ bare aiohttp: {ratio['p50']:.2f} at p50, {ratio['p99']:.2f} at p99 "
        f"({result['calls_per_side']} calls a side, uvloop {'on' if result['uvloop'] else 'off'})."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    xs = range(2)
    width = 0.38
    for offset, (side, label) in zip(
        (-width / 2, width / 2), (("aiohttp", "bare aiohttp"), ("worker", "the worker's client")), strict=True
    ):
        ax.bar([x + offset for x in xs], [result[side][q] * 1000 for q in ("p50", "p99")], width, label=label)
    ax.set_xticks(list(xs), ["p50", "p99"])
    ax.set_ylabel("µs per call")
    ax.set_title("The worker's call to its backend")
    ax.legend()
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
