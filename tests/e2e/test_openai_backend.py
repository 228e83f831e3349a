"""`OpenAIBackend` against a real third-party OpenAI-compatible server: llama-cpp-python's `llama_cpp.server`.

The server runs as a child process serving the packaged Gemma 3 270M as `gemma3:270m`, with `--api_key`, so
every test here also proves the backend sends `Authorization: Bearer <key>` (the server answers 401 without it).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.errors import BackendError, ModelUnavailable
from gputorrent.protocol import ChatMessage, GenerationDone, InferenceOptions, Job, TokenChunk
from gputorrent.worker.backends.llamacpp import packaged_model_path
from gputorrent.worker.backends.openai import OpenAIBackend

pytestmark = pytest.mark.model

MODEL = "gemma3:270m"
API_KEY = "test-key-" + uuid.uuid4().hex[:8]
SERVER_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LlamaCppServer:
    base_url: str  # ends in /v1
    api_key: str
    log_path: Path


def _models_answer(url: str, api_key: str) -> bool:
    try:
        response = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=2)
    except httpx.TransportError:
        return False
    return response.status_code == 200


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    """`python -m llama_cpp.server` on a free port, answering GET /v1/models; terminated at teardown."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_cpp_server") / "server.log"
    # fmt: off
    args = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_model_path()), "--chat_format", "gemma",
        "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--api_key", API_KEY,
    ]
    # fmt: on
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _models_answer(url, API_KEY):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer GET /v1/models"
                pytest.fail(f"llama_cpp.server {why}; its log:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        yield LlamaCppServer(base_url=url, api_key=API_KEY, log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _job(*, prompt: str | None = None, messages: list[ChatMessage] | None = None, **options: Any) -> Job:
    return Job(
        request_id=uuid.uuid4().hex,
        worker_id="w-openai",
        model=MODEL,
        prompt=prompt,
        messages=messages,
        options=InferenceOptions(**{"temperature": 0.0, "seed": 0, **options}),
        enqueued_at=time.time(),
    )


async def _run(backend: OpenAIBackend, job: Job) -> tuple[str, GenerationDone]:
    items = [item async for item in backend.generate(job)]
    assert isinstance(items[-1], GenerationDone), items
    assert all(isinstance(item, TokenChunk) for item in items[:-1]), items
    text = "".join(item.text for item in items[:-1] if isinstance(item, TokenChunk))
    return text, items[-1]


async def test_load_none_picks_the_served_model_and_unknown_model_lists_what_is_served(
    llama_cpp_server: LlamaCppServer,
) -> None:
    backend = OpenAIBackend(base_url=llama_cpp_server.base_url, api_key=llama_cpp_server.api_key)
    try:
        assert await backend.list_models() == [MODEL]
        assert await backend.load(None) == MODEL
        with pytest.raises(ModelUnavailable) as caught:
            await backend.load("nope")
        assert "'nope'" in caught.value.message
        assert f"it serves {MODEL}" in caught.value.message
    finally:
        await backend.close()


async def test_prompt_job_returns_text_and_usage_within_max_tokens(llama_cpp_server: LlamaCppServer) -> None:
    backend = OpenAIBackend(base_url=llama_cpp_server.base_url, api_key=llama_cpp_server.api_key)
    try:
        await backend.load(MODEL)
        text, done = await _run(backend, _job(prompt="The capital of France is", max_tokens=8))
        assert text.strip()
        assert done.prompt_tokens > 0
        assert 0 < done.completion_tokens <= 8
        assert done.finish_reason in {"stop", "length"}

        text, done = await _run(backend, _job(prompt="Once upon a time", max_tokens=3))
        assert 0 < done.completion_tokens <= 3
        # Three tokens end a story this early only by running out of budget.
        assert done.finish_reason == "length" or done.completion_tokens < 3
    finally:
        await backend.close()


async def test_messages_job_returns_text(llama_cpp_server: LlamaCppServer) -> None:
    backend = OpenAIBackend(base_url=llama_cpp_server.base_url, api_key=llama_cpp_server.api_key)
    try:
        await backend.load(MODEL)
        messages = [ChatMessage(role="user", content="Say hello.")]
        text, done = await _run(backend, _job(messages=messages, max_tokens=16))
        assert text.strip()
        assert done.prompt_tokens > 0 and 0 < done.completion_tokens <= 16
    finally:
        await backend.close()


async def test_json_format_is_sent_as_response_format_and_the_server_keeps_to_it(
    llama_cpp_server: LlamaCppServer,
) -> None:
    """llama-cpp-python's server reads `response_format` of type `json_object` (a JSON schema it
    reads only in its own spelling, so the schema case is covered on the llama.cpp backend)."""
    backend = OpenAIBackend(base_url=llama_cpp_server.base_url, api_key=llama_cpp_server.api_key)
    try:
        await backend.load(MODEL)
        messages = [ChatMessage(role="user", content="Name a fruit.")]
        free, _ = await _run(backend, _job(messages=messages, max_tokens=12))
        constrained, _ = await _run(backend, _job(messages=messages, max_tokens=12, format="json"))
        assert not free.lstrip().startswith("{")  # the model would not write JSON unasked
        assert constrained.startswith("{")  # JSON's grammar allows no leading space
    finally:
        await backend.close()


@pytest.mark.parametrize("api_key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
async def test_missing_or_wrong_api_key_is_a_backend_error(
    llama_cpp_server: LlamaCppServer, api_key: str | None
) -> None:
    """The server checks `Authorization: Bearer`; the tests above pass only because the right key is sent."""
    backend = OpenAIBackend(base_url=llama_cpp_server.base_url, api_key=api_key)
    try:
        with pytest.raises(BackendError) as at_load:
            await backend.load(MODEL)
        assert "401" in at_load.value.message
        assert not isinstance(at_load.value, ModelUnavailable)
        with pytest.raises(BackendError) as at_generate:
            await _run(backend, _job(prompt="hi", max_tokens=4))
        assert "401" in at_generate.value.message
    finally:
        await backend.close()


def test_pool_end_to_end_through_an_openai_worker(
    llama_cpp_server: LlamaCppServer,
    start_worker: Callable[..., Any],
    coordinator_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Coordinator and worker processes; the worker's openai backend drives llama_cpp.server."""
    monkeypatch.setenv("OPENAI_API_KEY", llama_cpp_server.api_key)  # the worker process inherits it
    start_worker("openai-w1", "--openai-base-url", llama_cpp_server.base_url, "--model", MODEL, backend="openai")
    with APIClient(coordinator_url) as client:
        (worker,) = client.workers()
        assert worker.worker_id == "openai-w1" and worker.backend == "openai" and worker.models == [MODEL]
        result = client.infer(MODEL, "The capital of France is", options={"max_tokens": 8}, timeout_s=60)
    assert result.status == "completed"
    assert result.output and result.output.strip()
    assert 0 < result.usage.completion_tokens <= 8
    assert result.usage.prompt_tokens > 0
    assert result.worker_id == "openai-w1"
    assert result.model == MODEL


async def test_a_streamed_job_arrives_in_pieces_from_the_real_server(llama_cpp_server: LlamaCppServer) -> None:
    """llama_cpp.server ignores `stream_options.include_usage`: completion tokens are counted per chunk."""
    backend = OpenAIBackend(base_url=llama_cpp_server.base_url, api_key=llama_cpp_server.api_key)
    try:
        await backend.load(MODEL)
        job = _job(prompt="Once upon a time", max_tokens=8).model_copy(update={"stream": True})
        items = [item async for item in backend.generate(job)]
        chunks = [item for item in items if isinstance(item, TokenChunk)]
        done = items[-1]
        assert isinstance(done, GenerationDone)
        assert len(chunks) > 2
        assert done.completion_tokens == len(chunks) <= 8
        assert done.finish_reason in {"stop", "length"}

        chat = _job(messages=[ChatMessage(role="user", content="Say hi.")], max_tokens=6)
        chat_items = [item async for item in backend.generate(chat.model_copy(update={"stream": True}))]
        assert "".join(i.text for i in chat_items if isinstance(i, TokenChunk)).strip()
    finally:
        await backend.close()
