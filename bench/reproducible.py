"""B7, what reproducible answers cost on the packaged model: prompt reuse and exact resumption.

Two measurements on one in-process `llamacpp` backend (the worker's own code, Gemma 3 270M from
its package), each side by side in one run:

1. Time to first token of a request whose prompt shares a long prefix (a system text of about
   700 tokens) with the request before it, and of a chat's second turn (whose prompt holds the
   first answer). Three sides: sampled (llama-cpp-python's longest-prefix reuse), reproducible
   (temperature 0: whole 64-token chunks of an earlier prompt only, so the text never depends on
   the worker's history), and no reuse at all (the prompt evaluated from an empty cache, the
   cost of the simplest way to be exact).
2. A stream that lost its worker after N tokens, resumed on the backend: the time from the
   takeover to the first new token, replayed and checked (exact) against continued from the
   text sent (not exact), for several N.

    .venv/bin/python bench/reproducible.py --rounds 5

Prints a Markdown table and writes bench/results/reproducible.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from pool import save_plot, version, write_result

from gputorrent.config import PACKAGED_MODEL
from gputorrent.protocol import ChatMessage, InferenceOptions, Job, TokenChunk
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends.llamacpp import LlamaCppBackend
from gputorrent.worker.executor import execute

N_CTX = 4096  # the worker's default
SYSTEM = " ".join(
    f"Rule {i}: answer in plain English, keep to the facts you are sure of, and say so when you do not know."
    for i in range(1, 30)
)
QUESTIONS = ("Name a colour.", "What is two plus two?", "Name a planet.", "Say hello in French.", "Name a fruit.")
STORY = "The history of the Roman Empire is long and complicated. It was founded"
SEAMS = (8, 32, 96)


def _job(messages: list[ChatMessage] | None = None, prompt: str | None = None, **options: Any) -> Job:
    return Job(
        request_id="bench", worker_id="bench", model=PACKAGED_MODEL, prompt=prompt, messages=messages,
        options=InferenceOptions.model_validate(options), enqueued_at=time.time(), stream=True,
    )  # fmt: skip


async def _first_token_ms(backend: LlamaCppBackend, job: Job) -> tuple[float, str]:
    """(ms to the first token, the whole text) of one generation."""
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    async for item in backend.generate(job):
        if isinstance(item, TokenChunk):
            first = first if first is not None else (time.perf_counter() - started) * 1000
            text.append(item.text)
    assert first is not None
    return first, "".join(text)


def _forget_prompts(backend: LlamaCppBackend) -> None:
    """Leave a reproducible request nothing to reuse, as if the worker cleared its cache: the no-reuse side."""
    backend._aligned = 0  # the backend's own bookkeeping (see `LlamaCppBackend._reuse_prefix`)


async def prefix_reuse(backend: LlamaCppBackend, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms to the first token of a shared-prefix request and of a chat's second turn, a side each."""
    sides = {"sampled": {"temperature": 0.8}, "reproducible": {"temperature": 0}, "no_reuse": {"temperature": 0}}
    shared: dict[str, list[float]] = {side: [] for side in sides}
    second_turn: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(rounds):
        for side, options in sides.items():  # interleaved, so every side sees the same machine noise
            question = QUESTIONS[i % len(QUESTIONS)]
            system = ChatMessage(role="system", content=SYSTEM)
            await _first_token_ms(backend, _job([system, ChatMessage(role="user", content="Hello.")], max_tokens=1))
            if side == "no_reuse":
                _forget_prompts(backend)
            ms, answer = await _first_token_ms(
                backend, _job([system, ChatMessage(role="user", content=question)], max_tokens=48, **options)
            )
            shared[side].append(ms)
            turns = [
                system,
                ChatMessage(role="user", content=question),
                ChatMessage(role="assistant", content=answer),
                ChatMessage(role="user", content="Why?"),
            ]
            if side == "no_reuse":
                _forget_prompts(backend)
            second_turn[side].append((await _first_token_ms(backend, _job(turns, max_tokens=1, **options)))[0])
    return {
        "shared_prefix": {side: statistics.median(v) for side, v in shared.items()},
        "second_turn": {side: statistics.median(v) for side, v in second_turn.items()},
    }


async def resumption(backend: LlamaCppBackend, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms from taking over a stream that had N tokens sent to its first new token, replayed and
    continued, for each N in SEAMS; and whether every replay was exact."""
    whole = _job(prompt=STORY, max_tokens=max(SEAMS) + 24, temperature=0)
    chunks = [item.text async for item in backend.generate(whole) if isinstance(item, TokenChunk)]
    out: dict[str, dict[str, float]] = {"replayed": {}, "continued": {}}
    exact = True
    for seam in SEAMS:
        job = whole.model_copy(update={"continuation": "".join(chunks[:seam]), "continuation_tokens": seam})
        times: dict[str, list[float]] = {"replayed": [], "continued": []}
        for _ in range(rounds):
            for side, replay_max_tokens in (("replayed", seam), ("continued", 0)):
                first: list[float] = []
                started = time.perf_counter()

                async def append(text: str, tokens: int, first: list[float] = first, started: float = started) -> bool:
                    first.append((time.perf_counter() - started) * 1000)
                    return True

                writer = StreamWriter(append)
                result = await execute(backend, job, writer, replay_max_tokens=replay_max_tokens)
                await writer.close()
                times[side].append(first[0])
                if side == "replayed":
                    exact = exact and result.resumed is not None and result.resumed.exact
        for side, values in times.items():
            out[side][str(seam)] = statistics.median(values)
    out["all_replays_exact"] = {"value": float(exact)}
    return out


async def run(rounds: int) -> dict[str, Any]:
    backend = LlamaCppBackend(n_ctx=N_CTX, n_gpu_layers=-1)
    await backend.load(PACKAGED_MODEL)
    try:
        return {
            "model": PACKAGED_MODEL,
            "rounds": rounds,
            "llama_cpp_python": version("llama-cpp-python"),
            "prefix": await prefix_reuse(backend, rounds),
            "resume": await resumption(backend, rounds),
        }
    finally:
        await backend.close()


def table(result: dict[str, Any]) -> str:
    """The Markdown tables of docs/benchmarks.md for these results."""
    prefix = result["prefix"]
    rows = [
        "| request | sampled: longest-prefix reuse | reproducible: whole-chunk reuse | no reuse |",
        "|---|---|---|---|",
    ]
    for key, label in (("shared_prefix", "new question, same system text"), ("second_turn", "a chat's second turn")):
        ms = prefix[key]
        rows.append(
            f"| {label} | {ms['sampled']:.0f} ms | {ms['reproducible']:.0f} ms "
            f"({ms['reproducible'] / ms['sampled']:.1f}x) | {ms['no_reuse']:.0f} ms "
            f"({ms['no_reuse'] / ms['sampled']:.1f}x) |"
        )
    rows += [
        "",
        "| tokens sent before the worker died | replayed and checked (exact) | continued from the text (not exact) |",
        "|---|---|---|",
    ]
    resume = result["resume"]
    for seam in SEAMS:
        replayed, continued = resume["replayed"][str(seam)], resume["continued"][str(seam)]
        rows.append(f"| {seam} | {replayed:.0f} ms | {continued:.0f} ms |")
    exact = "every replay was exact" if resume["all_replays_exact"]["value"] else "SOME REPLAYS DIFFERED"
    rows.append(
        f"\nTime to the first token (medians of {result['rounds']} rounds; the second table from the takeover "
        f"to the first new token); {exact}; llama-cpp-python {result['llama_cpp_python']}."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    sides = ("sampled", "reproducible", "no_reuse")
    for offset, key in enumerate(("shared_prefix", "second_turn")):
        values = [result["prefix"][key][side] for side in sides]
        left.bar([i + offset * 0.4 for i in range(3)], values, width=0.4, label=key.replace("_", " "))
    left.set_xticks([i + 0.2 for i in range(3)], ["sampled", "reproducible", "no reuse"])
    left.set_ylabel("ms to first token")
    left.legend()
    seams = [str(s) for s in SEAMS]
    for side in ("replayed", "continued"):
        right.plot(seams, [result["resume"][side][s] for s in seams], marker="o", label=side)
    right.set_xlabel("tokens sent before the worker died")
    right.set_ylabel("ms to the first new token")
    right.legend()
    fig.suptitle(f"B7 reproducible answers ({result['model']})")
    save_plot(fig, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds))
    print(table(result))
    print(f"written to {write_result('reproducible', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
