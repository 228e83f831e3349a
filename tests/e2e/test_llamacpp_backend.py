"""The in-process llama.cpp backend on the packaged Gemma 3 270M model."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest

from gputorrent.errors import InvalidRequest, ModelUnavailable
from gputorrent.protocol import ChatMessage, GenerationDone, InferenceOptions, Job, TokenChunk
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends.llamacpp import LlamaCppBackend
from gputorrent.worker.executor import execute

pytestmark = pytest.mark.model


@pytest.fixture
async def backend() -> AsyncIterator[LlamaCppBackend]:
    """A fresh load per test: the packaged model loads in under a second."""
    llama = LlamaCppBackend(n_ctx=1024, n_gpu_layers=-1)
    assert await llama.load("gemma3:270m") == "gemma3:270m"
    yield llama
    await llama.close()


def _job(prompt: str | None = None, messages: list[ChatMessage] | None = None, **options: object) -> Job:
    return Job(
        request_id="r", worker_id="w", model="gemma3:270m", prompt=prompt, messages=messages,
        options=InferenceOptions.model_validate(options), enqueued_at=time.time(),
    )  # fmt: skip


async def _run(backend: LlamaCppBackend, job: Job) -> tuple[str, GenerationDone]:
    items = [item async for item in backend.generate(job)]
    *chunks, done = items
    assert isinstance(done, GenerationDone)
    assert all(isinstance(c, TokenChunk) for c in chunks)
    return "".join(c.text for c in chunks if isinstance(c, TokenChunk)), done


async def _tokens(backend: LlamaCppBackend, job: Job) -> list[str]:
    return [item.text async for item in backend.generate(job) if isinstance(item, TokenChunk)]


async def test_a_prompt_gets_a_completion_with_token_counts(backend: LlamaCppBackend) -> None:
    text, done = await _run(backend, _job("The capital of France is", max_tokens=8, temperature=0))
    assert text.strip()
    assert done.prompt_tokens > 0
    assert 0 < done.completion_tokens <= 8


async def test_chat_uses_the_gemma_format(backend: LlamaCppBackend) -> None:
    messages = [ChatMessage(role="user", content="Name a colour.")]
    text, done = await _run(backend, _job(messages=messages, max_tokens=8, temperature=0))
    assert text.strip()
    assert "<start_of_turn>" not in text
    assert done.prompt_tokens > 5  # the turn markers are counted too


async def test_the_same_seed_gives_the_same_text(backend: LlamaCppBackend) -> None:
    job = _job("Once upon a time", max_tokens=12, temperature=1.0, seed=42)
    first, _ = await _run(backend, job)
    second, _ = await _run(backend, job)
    assert first == second


async def test_max_tokens_ends_the_generation_with_reason_length(backend: LlamaCppBackend) -> None:
    _, done = await _run(backend, _job("Count: one, two, three,", max_tokens=2, temperature=0))
    assert done.completion_tokens == 2
    assert done.finish_reason == "length"


async def test_an_unknown_model_is_refused_clearly() -> None:
    with pytest.raises(ModelUnavailable, match="neither a GGUF file, a packaged model"):
        await LlamaCppBackend(n_ctx=512, n_gpu_layers=0).load("llama3.2")


async def test_tokens_stream_one_by_one(backend: LlamaCppBackend) -> None:
    items = [item async for item in backend.generate(_job("Once upon a time", max_tokens=8, temperature=0))]
    chunks = [i for i in items if isinstance(i, TokenChunk)]
    assert len(chunks) >= 4  # not one block at the end


async def test_abandoning_a_stream_stops_generation_and_frees_the_model(backend: LlamaCppBackend) -> None:
    stream = backend.generate(_job("Write a long story about a dragon.", max_tokens=2000, temperature=0))
    first = await anext(stream)
    assert isinstance(first, TokenChunk)
    started = time.monotonic()
    await stream.aclose()  # must not wait for 2000 tokens
    assert time.monotonic() - started < 5
    text, _ = await _run(backend, _job("The capital of France is", max_tokens=4, temperature=0))
    assert text.strip()


async def test_a_system_message_is_kept_for_gemma(backend: LlamaCppBackend) -> None:
    user = ChatMessage(role="user", content="Name a colour.")
    system = ChatMessage(role="system", content="You answer in exactly one word, in capitals.")
    _, without = await _run(backend, _job(messages=[user], max_tokens=2, temperature=0))
    _, with_system = await _run(backend, _job(messages=[system, user], max_tokens=2, temperature=0))
    assert with_system.prompt_tokens > without.prompt_tokens + 5


@pytest.mark.parametrize("chat", [False, True], ids=["prompt", "chat"])
async def test_a_resumed_greedy_stream_is_replayed_checked_and_exact_at_every_seam(
    backend: LlamaCppBackend, chat: bool
) -> None:
    """What mid-stream failover relies on: another worker given the text sent so far replays the
    request, checks it wrote that text, and pushes only what follows: the whole is the uninterrupted
    run's, token for token, and the result says so. (The same context serves the reference and the
    replays: reproducible requests do not depend on its history.)"""
    messages = [ChatMessage(role="user", content="Count from one to twenty in words.")] if chat else None
    prompt = None if chat else "The planets of the solar system, in order from the sun, are"
    whole_job = _job(prompt, messages, max_tokens=24, temperature=0)
    chunks = await _tokens(backend, whole_job)
    assert len(chunks) >= 12
    for seam in (1, 8, len(chunks) - 1):
        sent = "".join(chunks[:seam])
        resumed_job = whole_job.model_copy(update={"continuation": sent, "continuation_tokens": seam})
        pushed: list[str] = []

        async def append(text: str, tokens: int, into: list[str] = pushed) -> bool:
            into.append(text)
            return True

        writer = StreamWriter(append)
        result = await execute(backend, resumed_job, writer, replay_max_tokens=64)
        await writer.close()
        assert result.status == "completed" and result.output == "".join(chunks)
        assert "".join(pushed) == "".join(chunks[seam:])  # nothing sent before is sent again
        assert result.resumed is not None and result.resumed.exact, result.resumed
        assert result.usage.completion_tokens == 24


async def test_a_resumed_stream_past_the_replay_limit_continues_from_its_text_and_says_it_is_not_exact(
    backend: LlamaCppBackend,
) -> None:
    job = _job("The planets of the solar system, in order from the sun, are", max_tokens=16, temperature=0)
    chunks = await _tokens(backend, job)
    resumed_job = job.model_copy(update={"continuation": "".join(chunks[:6]), "continuation_tokens": 6})
    result = await execute(backend, resumed_job, replay_max_tokens=5)
    assert result.status == "completed" and result.output is not None
    assert result.output.startswith("".join(chunks[:6]))
    assert result.resumed is not None and not result.resumed.exact
    assert "GPUTORRENT_RESUME_REPLAY_MAX_TOKENS" in result.resumed.note


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


async def test_a_json_schema_format_constrains_the_output_to_it(backend: LlamaCppBackend) -> None:
    messages = [ChatMessage(role="user", content="Ann is 30 years old. Reply with her name and age.")]
    text, done = await _run(backend, _job(messages=messages, max_tokens=60, temperature=0, format=PERSON))
    person = json.loads(text)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    assert done.finish_reason == "stop"


async def test_a_schema_llama_cpp_cannot_use_is_an_invalid_request(backend: LlamaCppBackend) -> None:
    with pytest.raises(InvalidRequest, match=r"llama\.cpp cannot use this JSON schema"):
        await _run(backend, _job("Hi", max_tokens=8, format={"type": "no-such-type"}))


ROMAN = "The history of the Roman Empire is long and complicated. It was founded"
# Over two prompt chunks of 64 tokens, so that a reproducible request reuses whole chunks of it.
LONG_CONTEXT = " ".join(
    f"In year {year} the city of Rome held games, built roads and paid its soldiers." for year in range(1, 12)
)
REPRODUCIBLE_REQUESTS = [
    _job(ROMAN, max_tokens=24, temperature=0),
    _job(LONG_CONTEXT + " In conclusion,", max_tokens=16, temperature=0),
    _job(LONG_CONTEXT + " Overall, the city", max_tokens=16, temperature=0, seed=7),
    _job(messages=[ChatMessage(role="user", content="Write a story about a dragon.")], max_tokens=16, temperature=0),
    _job("Once upon a time", max_tokens=12, temperature=0.9, seed=42),
]
# What a busy worker ran before: longer prompts that begin with the same text (the prefix is reused),
# the same requests again (the whole prompt is cached), sampled requests and chats with their answers.
HISTORY = [
    _job(ROMAN + " in 27 BC when Augustus became the first emperor. The empire was", max_tokens=20, temperature=0),
    _job(LONG_CONTEXT + " In conclusion, the games", max_tokens=30, temperature=0.8),
    *REPRODUCIBLE_REQUESTS,
    _job(messages=[ChatMessage(role="user", content="Write a story about a dragon. Make it long.")], max_tokens=20),
    _job(LONG_CONTEXT, max_tokens=8, temperature=0),
]


async def test_a_reproducible_request_gives_the_same_tokens_whatever_the_worker_ran_before() -> None:
    """Temperature 0 or a fixed seed: every token the same on a fresh context and on one with a history
    of overlapping, repeated and sampled prompts (a reused cache prefix once changed greedy text)."""
    reference: list[list[str]] = []
    for job in REPRODUCIBLE_REQUESTS:  # each on a context that has run nothing else
        fresh = LlamaCppBackend(n_ctx=1024, n_gpu_layers=-1)
        await fresh.load("gemma3:270m")
        reference.append(await _tokens(fresh, job))
        await fresh.close()
    busy = LlamaCppBackend(n_ctx=1024, n_gpu_layers=-1)
    await busy.load("gemma3:270m")
    try:
        for before in HISTORY:
            await _tokens(busy, before)
            for job, expected in zip(REPRODUCIBLE_REQUESTS, reference, strict=True):
                assert await _tokens(busy, job) == expected, f"after {before.prompt or before.messages!r}"
    finally:
        await busy.close()
