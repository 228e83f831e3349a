"""The OpenAI-compatible API, driven by the official `openai` client against real processes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from gputorrent.worker.backends.fake import FAIL_TRIGGER
from tests.conftest import Process

StartWorker = Callable[..., Process]
PACED = {"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.2"}


_opened: list[openai.OpenAI] = []


def _client(coordinator_url: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{coordinator_url}/v1", api_key="unused", max_retries=0, timeout=60)
    _opened.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test made is closed after it, so no pooled socket outlives the test."""
    yield
    while _opened:
        _opened.pop().close()


def test_models_lists_what_live_workers_serve(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    start_worker("w2", "--model", "org/fake-7b")
    client = _client(coordinator_url)
    assert sorted(m.id for m in client.models.list()) == ["fake", "org/fake-7b"]
    assert client.models.retrieve("org/fake-7b").id == "org/fake-7b"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("nope")
    assert unknown.value.code == "model_not_found"


def test_chat_completion(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    reply = _client(coordinator_url).chat.completions.create(
        model="fake",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there friend"}],
        max_tokens=3,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 6)


def test_text_parts_are_joined(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    reply = _client(coordinator_url).chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]}],
    )
    assert reply.choices[0].message.content == "echo: one two"


def test_legacy_completion(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    reply = _client(coordinator_url).completions.create(model="fake", prompt="the cat sat", max_tokens=50)
    assert reply.choices[0].text == "echo: the cat sat"
    assert reply.choices[0].finish_reason == "stop"


def test_chat_streams_chunks_in_order_with_usage_last(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1", env=PACED)
    started = time.monotonic()
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None
    stream = _client(coordinator_url).chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "a b c d e f g h i"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        if chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "echo: a b c d e f g h i"
    assert usage is not None and usage.completion_tokens == 10
    # Ten tokens 0.2 s apart: the first arrives long before the last is generated.
    assert arrivals[0] < arrivals[-1] - 1.0
    assert len(pieces) >= 5


def test_completion_streams(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    stream = _client(coordinator_url).completions.create(model="fake", prompt="x y z", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "echo: x y z"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_errors_surface_as_the_sdks_own_exceptions(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    client = _client(coordinator_url)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="fake", messages=[])
    assert empty.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as image:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/i.png"}}]}],
        )
    assert "only text content" in image.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError) as temperature:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert temperature.value.param == "temperature"
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": FAIL_TRIGGER}])
    assert failed.value.status_code == 502
    assert "asked to fail" in failed.value.message


def test_a_client_that_leaves_a_stream_cancels_its_job(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1", env=PACED)
    body = {"model": "fake", "messages": [{"role": "user", "content": " ".join(["word"] * 200)}], "stream": True}
    with httpx.stream("POST", f"{coordinator_url}/v1/chat/completions", json=body, timeout=30) as response:
        request_id = ""
        for line in response.iter_lines():
            if '"content":"echo:"' in line:  # the first token: the job is running
                request_id = line.split('"id":"chatcmpl-', 1)[1].split('"', 1)[0]
                break
    assert request_id
    # 200 tokens at 0.2 s would take 40 s; the cancellation ends the job within a flush or two.
    result = httpx.get(f"{coordinator_url}/result/{request_id}", params={"wait": 20}, timeout=30).json()
    assert result["status"] == "failed"
    assert result["error"]["code"] == "cancelled"


@pytest.mark.model
def test_real_model_through_the_openai_client(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    client = _client(coordinator_url)
    reply = client.chat.completions.create(
        model="gemma3:270m", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    text = client.completions.create(model="gemma3:270m", prompt="The capital of France is", max_tokens=8)
    assert text.choices[0].text.strip()
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="gemma3:270m", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True
        )
        if c.choices
    ]
    assert len([p for p in pieces if p]) > 2
    assert "".join(pieces).strip()


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.model
def test_real_model_answers_in_the_json_schema_of_response_format(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    """The SDK's `parse` sends a strict JSON schema and validates the reply against its model: the
    worker's llama.cpp constrains sampling to the schema, whole and streamed."""
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    client = _client(coordinator_url)
    messages: list[Any] = [{"role": "user", "content": "Ann is 30 years old. Reply with her name and age."}]
    reply = client.chat.completions.parse(
        model="gemma3:270m", messages=messages, response_format=Person, max_tokens=60, temperature=0
    )
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and person.name
    schema = {"name": "person", "schema": Person.model_json_schema()}
    chunks = client.chat.completions.create(
        model="gemma3:270m", messages=messages, max_tokens=60, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": schema},
    )  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 2  # streamed as it was generated, not at the end
    assert Person.model_validate(json.loads("".join(pieces))).name


def test_a_json_schema_response_format_needs_its_json_schema(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    with pytest.raises(openai.BadRequestError) as refused:
        _client(coordinator_url).chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_schema"}
        )  # type: ignore[call-overload]
    assert refused.value.param == "response_format.json_schema"


def test_embeddings_one_vector_per_input_in_float_and_base64(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    client = _client(coordinator_url)
    reply = client.embeddings.create(model="fake", input=["alpha", "beta gamma"])  # the SDK asks for base64
    assert [d.index for d in reply.data] == [0, 1]
    assert [len(d.embedding) for d in reply.data] == [8, 8]
    assert reply.usage.prompt_tokens == 3
    as_floats = client.embeddings.create(model="fake", input="alpha", encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(reply.data[0].embedding)
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model="fake", input=[[1, 2, 3]])
    assert tokens.value.param == "input"


@pytest.mark.model
def test_real_model_embeddings_have_the_models_width(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    reply = _client(coordinator_url).embeddings.create(
        model="gemma3:270m", input=["The cat sat on the mat.", "A feline rested on a rug.", "Stock prices fell."]
    )
    widths = {len(d.embedding) for d in reply.data}
    assert widths == {640}  # Gemma 3 270M's hidden size: one pooled vector per text, not one per token
    assert reply.usage.prompt_tokens > 10
    cat, feline, stocks = (d.embedding for d in reply.data)
    assert _cosine(cat, feline) > _cosine(cat, stocks)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)
