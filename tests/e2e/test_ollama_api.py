"""The Ollama-compatible API, driven by the official `ollama` client against real processes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import ollama
import pytest
from pydantic import BaseModel

from gputorrent import __version__
from gputorrent.worker.backends.fake import FAIL_TRIGGER
from tests.conftest import Process

StartWorker = Callable[..., Process]
PACED = {"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.2"}
FINAL_STATS = {
    "done_reason",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}


@pytest.fixture
def client(coordinator_url: str) -> Iterator[ollama.Client]:
    with ollama.Client(host=coordinator_url, timeout=60) as client:
        yield client


def test_chat_and_generate_answer_in_one_object_without_streaming(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    reply = client.chat(
        model="fake",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there friend"}],
        options={"num_predict": 3, "temperature": 0, "top_k": 40},  # top_k: accepted, ignored
        stream=False,
    )
    assert (reply.model, reply.message.role, reply.message.content) == ("fake", "assistant", "echo: hello there")
    assert (reply.done, reply.done_reason) == (True, "length")
    assert (reply.prompt_eval_count, reply.eval_count) == (3, 3)
    assert reply.eval_duration is not None and reply.total_duration is not None
    assert reply.total_duration >= reply.eval_duration > 0
    text = client.generate(model="fake", prompt="the cat sat", system="the echo answers the user turn")
    assert (text.response, text.done, text.done_reason, text.eval_count) == ("echo: the cat sat", True, "stop", 4)
    assert text.context == []


def test_chat_streams_chunks_as_they_are_generated(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1", env=PACED)
    started = time.monotonic()
    arrivals: list[float] = []
    parts: list[ollama.ChatResponse] = []
    for part in client.chat(model="fake", messages=[{"role": "user", "content": "a b c d e f g h i"}], stream=True):
        arrivals.append(time.monotonic() - started)
        parts.append(part)
    *chunks, last = parts
    assert "".join(c.message.content or "" for c in chunks) == "echo: a b c d e f g h i"
    assert len(chunks) >= 5 and not any(c.done for c in chunks)
    assert (last.done, last.done_reason, last.message.content, last.eval_count) == (True, "stop", "", 10)
    # Ten tokens 0.2 s apart take 2 s: the first arrives long before the last is generated.
    assert arrivals[0] < arrivals[-1] - 1.0
    assert arrivals[-1] > 1.8


def test_generate_streams_ndjson_when_stream_is_absent(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    body = {"model": "fake", "prompt": "x y z", "keep_alive": "5m", "format": "json", "think": False}
    with httpx.stream("POST", f"{coordinator_url}/api/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *chunks, last = lines
    assert chunks and all(set(c) == {"model", "created_at", "response", "done"} for c in chunks)
    assert all(c["done"] is False and c["model"] == "fake" for c in chunks)
    assert "".join(c["response"] for c in chunks) == "echo: x y z"
    assert last["done"] is True and last["response"] == ""
    assert set(last) >= FINAL_STATS and last["eval_count"] == 4 and last["prompt_eval_count"] == 3


def test_generate_streams_through_the_client(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    parts = list(client.generate(model="fake", prompt="one two", stream=True))
    assert "".join(p.response or "" for p in parts) == "echo: one two"
    assert parts[-1].done and parts[-1].eval_count == 3


def test_list_ps_and_show_describe_what_live_workers_serve(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    start_worker("w2")
    [listed] = client.list().models
    assert listed.model == "fake" and listed.modified_at is not None
    assert listed.digest is not None and len(listed.digest) == 64  # Ollama's CLI prints digest[:12]
    [running] = client.ps().models
    assert (running.name, running.model) == ("fake", "fake")
    assert httpx.get(f"{coordinator_url}/api/ps", timeout=10).json()["models"][0]["workers"] == ["w1", "w2"]
    shown = client.show("fake")
    assert shown.capabilities == ["completion"] and shown.details is not None
    assert shown.modelfile is not None and "w1, w2" in shown.modelfile
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("nope")
    assert missing.value.status_code == 404
    assert missing.value.error.startswith("model 'nope' not found")


def test_a_name_without_tag_finds_the_latest_tag(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1", "--model", "echo:latest")
    reply = client.chat(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert (reply.model, reply.message.content) == ("echo", "echo: hi")
    assert client.show("echo").modelfile is not None
    assert client.pull("echo").status == "success"


def test_an_empty_request_loads_the_model(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    loaded = client.generate(model="fake")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert client.chat(model="fake", messages=[]).done_reason == "load"
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=[])
    assert missing.value.status_code == 404


def test_pull_succeeds_at_once_for_a_served_model_and_says_how_to_serve_another(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    """Pulls onto workers that can pull are in test_ollama_pull.py; a fake worker cannot."""
    start_worker("w1")
    assert client.pull("fake").status == "success"
    assert [p.status for p in client.pull("fake", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("nope")
    assert unknown.value.status_code == 503
    assert "start a worker with --backend ollama, or one with --model nope" in unknown.value.error


def test_version_is_the_coordinators(coordinator_url: str) -> None:
    response = httpx.get(f"{coordinator_url}/api/version", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"version": __version__}


def test_errors_are_ollama_shaped(coordinator_url: str, start_worker: StartWorker, client: ollama.Client) -> None:
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(ollama.ResponseError) as no_workers:
        client.chat(model="fake", messages=hello)
    assert no_workers.value.status_code == 503
    start_worker("w1")
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="nope", messages=hello)
    assert unknown.value.status_code == 404 and "model 'nope' not found" in unknown.value.error
    bad = httpx.post(f"{coordinator_url}/api/chat", json={"model": "fake", "messages": "x"}, timeout=10)
    assert bad.status_code == 400
    assert list(bad.json()) == ["error"] and "messages" in bad.json()["error"]
    with pytest.raises(ollama.ResponseError) as image:
        client.generate(model="fake", prompt="what is this?", images=[b"\x89PNG"])
    assert image.value.status_code == 400 and "images are not supported" in image.value.error
    with pytest.raises(ollama.ResponseError) as tools:
        client.chat(model="fake", messages=hello, tools=[{"type": "function", "function": {"name": "f"}}])
    assert tools.value.status_code == 400 and "does not support tools" in tools.value.error
    with pytest.raises(ollama.ResponseError) as temperature:
        client.chat(model="fake", messages=hello, options={"temperature": 5})
    assert temperature.value.status_code == 400 and "temperature" in temperature.value.error
    yaml = httpx.post(f"{coordinator_url}/api/chat", json={"model": "fake", "messages": hello, "format": "yaml"})
    assert yaml.status_code == 400 and "invalid format 'yaml'" in yaml.json()["error"]


def test_a_failed_job_is_an_error_whole_or_mid_stream(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    failing = [{"role": "user", "content": f"x {FAIL_TRIGGER}"}]
    with pytest.raises(ollama.ResponseError) as whole:
        client.chat(model="fake", messages=failing)
    assert whole.value.status_code == 502 and "asked to fail" in whole.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.chat(model="fake", messages=failing, stream=True))
    assert "asked to fail" in streamed.value.error  # the stream's last line: {"error": "..."}


def test_a_client_that_leaves_a_stream_frees_its_worker(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1", env=PACED)  # one slot: the next job waits until this one ends
    body = {"model": "fake", "messages": [{"role": "user", "content": " ".join(["word"] * 200)}]}
    with httpx.stream("POST", f"{coordinator_url}/api/chat", json=body, timeout=30) as response:
        first = json.loads(next(response.iter_lines()))
    assert first["message"]["content"] == "echo:"
    # 200 tokens at 0.2 s would hold the worker 40 s; cancelled, it is free within a flush or two.
    started = time.monotonic()
    reply = client.generate(model="fake", prompt="next", options={"num_predict": 2})
    assert reply.response == "echo: next"
    assert time.monotonic() - started < 15


@pytest.mark.model
def test_real_model_through_the_ollama_client(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    parts = list(
        client.chat(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Count to five."}],
            options={"num_predict": 8, "temperature": 0},
            stream=True,
        )
    )
    assert "".join(p.message.content or "" for p in parts).strip()
    assert parts[-1].done and parts[-1].eval_count is not None and 0 < parts[-1].eval_count <= 8
    text = client.generate(model="gemma3:270m", prompt="Name a fruit.", options={"num_predict": 8}, stream=False)
    assert text.response is not None and text.response.strip()
    assert text.prompt_eval_count is not None and text.prompt_eval_count > 3  # the chat template's turn markers
    vectors = client.embed(model="gemma3:270m", input=["The cat sat.", "Stocks fell."])
    assert [len(v) for v in vectors.embeddings] == [640, 640]  # pooled: one vector per text


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.model
def test_real_model_answers_in_the_json_schema_of_format(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    """`format` as a JSON schema (what LangChain's structured output sends): the worker's llama.cpp
    constrains sampling to it, on chat and generate, whole and streamed."""
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    prompt = "Ann is 30 years old. Reply with her name and age."
    options = {"num_predict": 60, "temperature": 0}
    schema = Person.model_json_schema()
    chat = client.chat(
        model="gemma3:270m", messages=[{"role": "user", "content": prompt}], format=schema, options=options
    )
    assert Person.model_validate_json(chat.message.content or "").name
    parts = list(client.generate(model="gemma3:270m", prompt=prompt, format=schema, options=options, stream=True))
    assert len([p for p in parts if p.response]) > 2
    assert Person.model_validate_json("".join(p.response or "" for p in parts)).name


def test_embed_gives_one_vector_per_input_and_the_old_endpoint_one(
    coordinator_url: str, start_worker: StartWorker, client: ollama.Client
) -> None:
    start_worker("w1")
    reply = client.embed(model="fake", input=["alpha", "beta gamma"])
    assert [len(v) for v in reply.embeddings] == [8, 8]
    assert reply.embeddings[0] != reply.embeddings[1]
    assert reply.prompt_eval_count == 3
    single = client.embed(model="fake", input="alpha")
    assert single.embeddings == reply.embeddings[:1]
    legacy = httpx.post(f"{coordinator_url}/api/embeddings", json={"model": "fake", "prompt": "alpha"}, timeout=30)
    assert legacy.json() == {"embedding": reply.embeddings[0]}
    with pytest.raises(ollama.ResponseError) as unknown:
        client.embed(model="nope", input="x")
    assert unknown.value.status_code == 404
