"""Streaming overhead: time to first token and the gap between tokens, through GPU Torrent and direct.

One run starts the fast OpenAI-compatible server (bench/fast_openai_server.py), a private
Redis-compatible server, a coordinator and one `openai`-backend worker in front of it, then
streams the same chat completion alternately straight from the fast server and through the
coordinator's `/v1/chat/completions`, so both sides see the same machine noise.

    .venv/bin/python bench/stream_latency.py --requests 200 --tokens 32 --gap-ms 5

Prints a Markdown table and writes bench/results/stream_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
from redis.asyncio import Redis

from gputorrent import auth
from gputorrent.embedded import EmbeddedRedis, free_port

HERE = Path(__file__).parent


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


def _wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def _wait_for_model(coordinator: str, model: str, headers: dict[str, str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while model not in httpx.get(f"{coordinator}/v1/models", headers=headers).text:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not register")
        time.sleep(0.1)


async def _keys(redis_url: str) -> tuple[str, str]:
    """A client key for the load and a join key for the worker, in the benchmark's private Redis."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        _, client_key = await auth.create_key(redis, "bench", "client")
        _, join_key = await auth.create_key(redis, "bench worker", "join")
    finally:
        await redis.aclose()
    return client_key, join_key


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean": statistics.fmean(ordered),
    }


async def measure(
    direct_url: str, pool_url: str, requests: int, tokens: int, pool_headers: dict[str, str]
) -> dict[str, object]:
    expected = "".join(f"t{i} " for i in range(tokens))
    samples: dict[str, dict[str, list[float]]] = {side: {"ttft": [], "gap": []} for side in ("direct", "pool")}
    wrong = {"direct": 0, "pool": 0}
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # warm both paths (connections, imports, JIT-free but cache-warm)
            await stream_once(http, direct_url, "fast", tokens, {})
            await stream_once(http, pool_url, "fast", tokens, pool_headers)
        for i in range(requests * 2):
            side, url, headers = ("direct", direct_url, {}) if i % 2 == 0 else ("pool", pool_url, pool_headers)
            ttft, gaps, text = await stream_once(http, url, "fast", tokens, headers)
            samples[side]["ttft"].append(ttft)
            samples[side]["gap"].extend(gaps)
            wrong[side] += text != expected
    result: dict[str, object] = {"requests_per_side": requests, "tokens_per_request": tokens, "wrong_text": wrong}
    for metric in ("ttft", "gap"):
        direct, pool = _summary(samples["direct"][metric]), _summary(samples["pool"][metric])
        result[metric] = {"direct": direct, "pool": pool, "added_p50_ms": pool["p50"] - direct["p50"]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="streams per side")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="the fast server's pause between tokens")
    args = parser.parse_args()

    children: list[subprocess.Popen[bytes]] = []
    python = [sys.executable, "-m", "gputorrent", "--log-level", "warning"]
    with EmbeddedRedis() as redis:
        try:
            fast_port, coord_port = free_port(), free_port()
            fast = f"http://127.0.0.1:{fast_port}/v1"
            coordinator = f"http://127.0.0.1:{coord_port}"
            server = [sys.executable, str(HERE / "fast_openai_server.py"), "--port", str(fast_port)]
            children.append(subprocess.Popen([*server, "--gap-ms", str(args.gap_ms)]))
            _wait_http(f"{fast}/models")
            # As users run it: authentication on, with a client key checked (and counted) on every request;
            # the limit is raised only so the run is not refused.
            client_key, join_key = asyncio.run(_keys(redis.url))
            coordinator_env = {**os.environ, "GPUTORRENT_RATE_LIMIT_RPM": "1000000"}
            children.append(
                subprocess.Popen(
                    [*python, "coordinator", "--port", str(coord_port), "--redis-url", redis.url], env=coordinator_env
                )
            )
            _wait_http(f"{coordinator}/health")
            worker = ["worker", "--backend", "openai", "--openai-base-url", fast, "--model", "fast"]
            children.append(
                subprocess.Popen(
                    [*python, *worker, "--coordinator", coordinator, "--redis-url", redis.url],
                    env={**os.environ, "GPUTORRENT_JOIN_TOKEN": join_key},
                )
            )
            headers = {"Authorization": f"Bearer {client_key}"}
            _wait_for_model(coordinator, "fast", headers)
            direct_url, pool_url = f"{fast}/chat/completions", f"{coordinator}/v1/chat/completions"
            result = asyncio.run(measure(direct_url, pool_url, args.requests, args.tokens, headers))
        finally:
            for child in reversed(children):
                child.terminate()
                child.wait(timeout=10)
    result["gap_ms_configured"] = args.gap_ms
    out = HERE / "results" / "stream_latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(_table(result))
    return 0


def _table(result: dict[str, object]) -> str:
    rows = [
        "| metric | direct p50 | through GPU Torrent p50 | added p50 | direct p99 | through p99 |",
        "|---|---|---|---|---|---|",
    ]
    for metric, label in (("ttft", "time to first token (ms)"), ("gap", "gap between tokens (ms)")):
        m = result[metric]
        assert isinstance(m, dict)
        d, p = m["direct"], m["pool"]
        added = m["added_p50_ms"]
        rows.append(f"| {label} | {d['p50']:.2f} | {p['p50']:.2f} | {added:+.2f} | {d['p99']:.2f} | {p['p99']:.2f} |")
    rows.append(f"\nstreams whose text differed from the expected tokens: {result['wrong_text']}")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
