"""`OllamaBackend` against a stand-in for Ollama's documented REST protocol — NOT a real Ollama (see
tests/ollama_standin.py for what the stand-in answers and why it exists)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from gputorrent.embedded import free_port
from gputorrent.errors import BackendError, ModelUnavailable
from gputorrent.protocol import ChatMessage, GenerationDone, InferenceOptions, Job, TokenChunk
from gputorrent.worker.backends.ollama import OllamaBackend
from tests.ollama_standin import CHAT_REPLY, GENERATE_REPLY, PULL_NOT_FOUND, OllamaProtocolStandin


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[..., OllamaBackend]]:
    """Backends made here are closed at teardown, so no client session is left open."""
    made: list[OllamaBackend] = []

    def make(host: str) -> OllamaBackend:
        backend = OllamaBackend(host=host)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def _job(model: str, *, prompt: str | None = None, messages: list[ChatMessage] | None = None, **options: Any) -> Job:
    return Job(
        request_id=uuid.uuid4().hex,
        worker_id="w-ollama",
        model=model,
        prompt=prompt,
        messages=messages,
        options=InferenceOptions(**options),
        enqueued_at=time.time(),
    )


async def _run(backend: OllamaBackend, job: Job) -> list[TokenChunk | GenerationDone]:
    return [item async for item in backend.generate(job)]


@pytest.mark.parametrize("wanted", ["llama3.2", "llama3.2:latest", None])
async def test_load_of_a_listed_model_does_not_pull_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend], wanted: str | None
) -> None:
    """`llama3.2` matches the `llama3.2:latest` that /api/tags lists (None means the default, llama3.2)."""
    backend = make_backend(ollama_protocol_standin.url)
    served = await backend.load(wanted)
    assert served == (wanted or "llama3.2")
    assert len(ollama_protocol_standin.requests_to("/api/tags")) == 1
    assert ollama_protocol_standin.requests_to("/api/pull") == []


async def test_load_of_a_missing_model_pulls_it_then_serves_it_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    assert await backend.load("qwen2.5:0.5b") == "qwen2.5:0.5b"

    pulls = ollama_protocol_standin.requests_to("/api/pull")
    assert [p.body for p in pulls] == [{"model": "qwen2.5:0.5b", "stream": True}]
    assert "qwen2.5:0.5b" in await backend.list_models()
    # The stand-in answers 404 for a model it does not have, so this only works because the pull happened.
    items = await _run(backend, _job("qwen2.5:0.5b", prompt="Where is Paris?"))
    assert isinstance(items[-1], GenerationDone) and items[-1].completion_tokens > 0


async def test_an_hf_pull_goes_through_ollama_and_no_token_is_sent_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    """Ollama authenticates to Hugging Face with its own ed25519 key, never with a bearer token it is
    sent: a token on the request would only travel, in clear, to wherever OLLAMA_HOST points."""
    hf_model = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    backend = make_backend(ollama_protocol_standin.url)
    await backend.load(hf_model)
    (pull,) = ollama_protocol_standin.requests_to("/api/pull")
    assert pull.body["model"] == hf_model
    assert all("Authorization" not in r.headers for r in ollama_protocol_standin.received)


async def test_failing_pull_raises_model_unavailable_naming_the_model_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    with pytest.raises(ModelUnavailable) as caught:
        await backend.load("no-such-model:7b")
    assert "no-such-model:7b" in caught.value.message
    assert PULL_NOT_FOUND in caught.value.message
    assert caught.value.code == "model_unavailable"
    assert "no-such-model:7b" not in await backend.list_models()


async def test_prompt_job_maps_options_and_usage_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    await backend.load("llama3.2")
    job = _job(
        "llama3.2", prompt="The capital of France is", max_tokens=3, temperature=0.2, top_p=0.5, seed=42, stop=["\n"]
    )
    items = await _run(backend, job)

    (request,) = ollama_protocol_standin.requests_to("/api/generate")
    assert request.body == {
        "model": "llama3.2",
        "prompt": "The capital of France is",
        "stream": False,
        "options": {"num_predict": 3, "temperature": 0.2, "top_p": 0.5, "seed": 42, "stop": ["\n"]},
    }
    assert ollama_protocol_standin.requests_to("/api/chat") == []
    # The stand-in cut its reply at num_predict=3 words, so Ollama's done_reason is "length".
    assert items == [
        TokenChunk(text="Paris is the"),
        GenerationDone(prompt_tokens=5, completion_tokens=3, finish_reason="length"),
    ]


async def test_prompt_job_without_seed_or_stop_omits_them_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    items = await _run(backend, _job("llama3.2", prompt="Hi there", max_tokens=64))
    (request,) = ollama_protocol_standin.requests_to("/api/generate")
    assert set(request.body["options"]) == {"num_predict", "temperature", "top_p"}
    assert "format" not in request.body
    assert items == [
        TokenChunk(text=GENERATE_REPLY),
        GenerationDone(prompt_tokens=2, completion_tokens=len(GENERATE_REPLY.split()), finish_reason="stop"),
    ]


async def test_messages_job_calls_api_chat_with_the_messages_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    messages = [
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Say hello."),
    ]
    items = await _run(backend, _job("llama3.2", messages=messages, max_tokens=32))

    (request,) = ollama_protocol_standin.requests_to("/api/chat")
    assert request.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    assert request.body["stream"] is False and "prompt" not in request.body
    assert ollama_protocol_standin.requests_to("/api/generate") == []
    assert items == [
        TokenChunk(text=CHAT_REPLY),
        GenerationDone(prompt_tokens=5, completion_tokens=len(CHAT_REPLY.split()), finish_reason="stop"),
    ]


@pytest.mark.parametrize("output_format", ["json", {"type": "object", "required": ["name"]}], ids=["json", "schema"])
async def test_format_goes_to_ollama_as_its_format_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend], output_format: Any
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    await _run(backend, _job("llama3.2", prompt="Hi there", max_tokens=8, format=output_format))
    (request,) = ollama_protocol_standin.requests_to("/api/generate")
    assert request.body["format"] == output_format


@pytest.mark.parametrize("chat", [False, True], ids=["generate", "chat"])
async def test_ollama_error_status_becomes_backend_error_with_its_message_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend], chat: bool
) -> None:
    backend = make_backend(ollama_protocol_standin.url)
    if chat:
        job = _job("absent:1b", messages=[ChatMessage(role="user", content="hi")])
    else:
        job = _job("absent:1b", prompt="hi")
    with pytest.raises(BackendError) as caught:
        await _run(backend, job)
    assert "404" in caught.value.message
    assert "model 'absent:1b' not found" in caught.value.message
    assert caught.value.code == "backend_error"


async def test_unreachable_host_raises_backend_error_naming_the_host(
    make_backend: Callable[..., OllamaBackend],
) -> None:
    """No stand-in here: nothing listens on the port, as when Ollama is not running."""
    host = f"http://127.0.0.1:{free_port()}"
    backend = make_backend(host)
    with pytest.raises(BackendError) as at_load:
        await backend.load("llama3.2")
    assert f"cannot reach Ollama at {host}" in at_load.value.message
    assert not isinstance(at_load.value, ModelUnavailable)

    with pytest.raises(BackendError) as at_generate:
        await _run(backend, _job("llama3.2", prompt="hi"))
    assert f"cannot reach Ollama at {host}" in at_generate.value.message


async def test_a_pull_that_ends_without_success_is_model_unavailable_documented_protocol(
    ollama_protocol_standin: OllamaProtocolStandin, make_backend: Callable[..., OllamaBackend]
) -> None:
    """A pull stream cut short (no `success` line) must not count as a loaded model."""

    async def cut_short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"status": "pulling manifest"}\n')
        await resp.write_eof()
        return resp

    ollama_protocol_standin._pull = cut_short  # type: ignore[method-assign]
    await ollama_protocol_standin.stop()
    await ollama_protocol_standin.start()
    with pytest.raises(ModelUnavailable, match="ended without success"):
        await make_backend(ollama_protocol_standin.url).load("qwen2.5:0.5b")


async def test_a_reply_that_is_not_json_is_a_backend_error(make_backend: Callable[..., OllamaBackend]) -> None:
    """Ollama answers unknown paths with a plain-text 404; a proxy may answer with HTML."""

    async def plain_text(_: web.Request) -> web.Response:
        return web.Response(status=404, text="404 page not found")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", plain_text)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        backend = make_backend(f"http://{host}:{port}")
        with pytest.raises(BackendError, match="answered 404: 404 page not found"):
            await backend.load("llama3.2")
        with pytest.raises(BackendError, match="answered 404"):
            await _run(backend, _job("llama3.2", prompt="hi"))
    finally:
        await runner.cleanup()
