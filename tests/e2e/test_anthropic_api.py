"""The Anthropic-compatible Messages API, driven by the official `anthropic` client against real processes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest
from pydantic import BaseModel

from gputorrent.embedded import free_port
from gputorrent.worker.backends.fake import FAIL_TRIGGER
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, alive_workers, wait_for

StartWorker = Callable[..., Process]
PACED = {"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.2"}
HEADERS = {"x-api-key": "unused", "anthropic-version": "2023-06-01"}


_opened: list[anthropic.Anthropic] = []


def _client(coordinator_url: str) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=coordinator_url, api_key="unused", max_retries=0, timeout=60)
    _opened.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test made is closed after it, so no pooled socket outlives the test."""
    yield
    while _opened:
        _opened.pop().close()


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def _sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, parsed data) for each server-sent event of a streamed response."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and data:
            events.append((name, json.loads(data)))
            name, data = "", ""
    return events


def test_create_returns_the_echo_with_stop_reason_and_usage(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    client = _client(coordinator_url)
    cut = client.messages.create(model="fake", max_tokens=3, messages=_user("hello there friend"))
    assert cut.type == "message"
    assert cut.role == "assistant"
    assert cut.model == "fake"
    assert cut.id.startswith("msg_") and len(cut.id) > len("msg_")
    assert [(block.type, getattr(block, "text", None)) for block in cut.content] == [("text", "echo: hello there")]
    assert cut.stop_reason == "max_tokens"
    assert cut.stop_sequence is None
    assert (cut.usage.input_tokens, cut.usage.output_tokens) == (3, 3)
    whole = client.messages.create(model="fake", max_tokens=50, messages=_user("hello there friend"))
    assert whole.stop_reason == "end_turn"
    assert whole.usage.output_tokens == 4
    assert whole.id != cut.id


def test_system_prompts_and_text_blocks_are_accepted(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    client = _client(coordinator_url)
    with_string = client.messages.create(model="fake", max_tokens=20, system="be brief", messages=_user("hi there"))
    assert with_string.content[0].type == "text" and with_string.content[0].text == "echo: hi there"
    blocks = client.messages.create(
        model="fake",
        max_tokens=20,
        system=[{"type": "text", "text": "be brief"}],
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
        ],
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "someone"},
        # This SDK version no longer has sampling parameters; the API still takes them.
        extra_body={"temperature": 0.3, "top_p": 0.9, "top_k": 40},
    )
    assert blocks.content[0].type == "text" and blocks.content[0].text == "echo: one two"  # the fake echoes the last


def test_a_stream_arrives_as_text_deltas_long_before_the_generation_ends(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1", env=PACED)
    arrivals: list[float] = []
    pieces: list[str] = []
    started = time.monotonic()
    with _client(coordinator_url).messages.stream(
        model="fake", max_tokens=50, messages=_user("a b c d e f g h i")
    ) as stream:
        for text in stream.text_stream:
            arrivals.append(time.monotonic() - started)
            pieces.append(text)
        final = stream.get_final_message()
    assert "".join(pieces) == "echo: a b c d e f g h i"
    # Ten tokens 0.2 s apart take 2 s to generate; the first is here well before that, the rest keep coming.
    assert arrivals[0] < 2.0
    assert arrivals[0] < arrivals[-1] - 1.0
    assert len(pieces) >= 3
    assert final.content[0].type == "text" and final.content[0].text == "echo: a b c d e f g h i"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 10)


def test_create_with_stream_yields_anthropics_event_sequence(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    events = list(
        _client(coordinator_url).messages.create(model="fake", max_tokens=2, messages=_user("x y z"), stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text == "echo: x"
    [delta] = [e for e in events if e.type == "message_delta"]
    assert delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 2


def test_the_raw_stream_is_anthropics_server_sent_events(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    body = {"model": "fake", "max_tokens": 10, "messages": _user("raw wire"), "stream": True}
    with httpx.stream("POST", f"{coordinator_url}/v1/messages", json=body, headers=HEADERS, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["request-id"]
        events = _sse_events(response)
    assert all(name == data["type"] for name, data in events)  # `event:` always names the data's type
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"] == f"msg_{request_id}"
    assert (start["role"], start["content"], start["stop_reason"]) == ("assistant", [], None)
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert "".join(d["delta"]["text"] for d in deltas) == "echo: raw wire"
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 2, "output_tokens": 3},
    }


def test_errors_surface_as_the_sdks_own_exceptions_in_anthropics_shape(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    client = _client(coordinator_url)
    with pytest.raises(anthropic.InternalServerError) as no_workers:
        client.messages.create(model="fake", max_tokens=5, messages=_user("x"))
    assert no_workers.value.status_code == 503
    start_worker("w1")
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="nope", max_tokens=5, messages=_user("x"))
    assert unknown.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'nope' is not served by any live worker"},
    }
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as non_text:
        client.messages.create(model="fake", max_tokens=5, messages=[{"role": "user", "content": [image]}])
    assert non_text.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0.content.0: only text content blocks are supported, not 'image'",
        },
    }
    with pytest.raises(anthropic.BadRequestError, match="top-level `system`"):
        client.messages.create(model="fake", max_tokens=5, messages=[{"role": "system", "content": "x"}])  # type: ignore[list-item,typeddict-item]
    with pytest.raises(anthropic.BadRequestError, match="tools are not supported"):
        client.messages.create(
            model="fake",
            max_tokens=5,
            messages=_user("x"),
            tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        )
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="fake", max_tokens=5, messages=_user("x"), extra_body={"temperature": 5})


def test_a_missing_max_tokens_or_a_bad_body_is_a_400_in_anthropics_shape(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1")
    url = f"{coordinator_url}/v1/messages"
    missing = httpx.post(url, json={"model": "fake", "messages": _user("x")}, headers=HEADERS, timeout=30)
    assert missing.status_code == 400
    assert missing.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    not_json = httpx.post(url, content=b"{not json", headers={**HEADERS, "content-type": "application/json"})
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    no_messages = httpx.post(url, json={"model": "fake", "max_tokens": 5, "messages": []}, headers=HEADERS)
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["message"].startswith("messages:")


def test_a_failed_job_is_an_api_error_with_or_without_streaming(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1")
    client = _client(coordinator_url)
    with pytest.raises(anthropic.InternalServerError) as failed:
        client.messages.create(model="fake", max_tokens=5, messages=_user(f"x {FAIL_TRIGGER}"))
    assert failed.value.status_code == 502
    assert failed.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "the fake backend was asked to fail"},
    }
    # Streamed, the 200 and the first events are already sent: the failure is an `error` event.
    events = []
    with pytest.raises(anthropic.APIStatusError) as streamed:
        for event in client.messages.create(
            model="fake", max_tokens=5, messages=_user(f"x {FAIL_TRIGGER}"), stream=True
        ):
            events.append(event.type)
    assert events == ["message_start", "content_block_start"]
    assert streamed.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "the fake backend was asked to fail"},
    }


def test_a_client_that_leaves_a_stream_cancels_its_job(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1", env=PACED)
    body = {"model": "fake", "max_tokens": 1000, "messages": _user(" ".join(["word"] * 200)), "stream": True}
    with httpx.stream("POST", f"{coordinator_url}/v1/messages", json=body, headers=HEADERS, timeout=30) as response:
        request_id = response.headers["request-id"]
        for line in response.iter_lines():
            if '"text_delta"' in line:  # the first token: the job is running
                break
        else:
            pytest.fail("the stream ended without a text delta")
    # 200 tokens at 0.2 s would take 40 s; the cancellation ends the job within a flush or two.
    result = httpx.get(f"{coordinator_url}/result/{request_id}", params={"wait": 20}, timeout=30).json()
    assert result["status"] == "failed"
    assert result["error"]["code"] == "cancelled"


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_an_answer_that_outlives_the_wait_is_a_timeout_error(processes: Callable[..., Process], redis_url: str) -> None:
    # A coordinator of its own: it waits at most 1 s for a result; the paced worker needs 4 s, then 2 s.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "2",
           "GPUTORRENT_MAX_SYNC_WAIT_S": "1", "GPUTORRENT_AUTH": "off"}  # fmt: skip
    coordinator = processes("coordinator", "--port", str(port), "--redis-url", redis_url, env=env, name="impatient")
    wait_for(lambda: _answers(url) or coordinator.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "the coordinator")
    assert coordinator.popen.poll() is None, coordinator.log
    worker = processes("worker", "--backend", "fake", "--coordinator", url, "--redis-url", redis_url,
                       "--worker-id", "w1", env=PACED, name="paced")  # fmt: skip
    wait_for(lambda: "w1" in alive_workers(url) or worker.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "w1")
    assert worker.popen.poll() is None, worker.log
    body = {"model": "fake", "max_tokens": 100, "messages": _user(" ".join(["word"] * 19)), "stream": True}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers=HEADERS, timeout=30) as response:
        assert response.status_code == 200
        events = _sse_events(response)
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert "content_block_delta" in kinds  # some text came before the wait ran out
    assert kinds[-1] == "error"
    assert "message_stop" not in kinds
    assert events[-1][1]["error"]["type"] == "timeout_error"
    assert "no result within 1 s" in events[-1][1]["error"]["message"]
    with pytest.raises(anthropic.InternalServerError) as waited:
        _client(url).messages.create(model="fake", max_tokens=100, messages=_user(" ".join(["word"] * 9)))
    assert waited.value.status_code == 504
    assert isinstance(waited.value.body, dict) and waited.value.body["error"]["type"] == "timeout_error"


@pytest.mark.model
def test_real_model_through_the_anthropic_client(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    client = _client(coordinator_url)
    reply = client.messages.create(
        model="gemma3:270m",
        max_tokens=8,
        system="Answer in one word.",
        messages=_user("Name a fruit."),
        extra_body={"temperature": 0},
    )
    assert reply.content[0].type == "text" and reply.content[0].text.strip()
    assert 0 < reply.usage.output_tokens <= 8
    assert reply.usage.input_tokens > 5  # the system turn and the chat format are counted too
    assert reply.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(model="gemma3:270m", max_tokens=8, messages=_user("Count to five.")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces).strip()
    assert final.content[0].type == "text" and final.content[0].text == "".join(pieces)
    assert 0 < final.usage.output_tokens <= 8


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.model
def test_real_model_answers_in_the_json_schema_of_output_config(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    """The SDK's `parse` sends `output_config.format` and validates the answer against its model:
    the worker's llama.cpp constrains sampling to the schema."""
    start_worker("w-llama", "--model", "gemma3:270m", backend="llamacpp")
    reply = _client(coordinator_url).messages.parse(
        model="gemma3:270m",
        max_tokens=60,
        messages=_user("Ann is 30 years old. Reply with her name and age."),
        output_format=Person,
        extra_body={"temperature": 0},
    )
    person = reply.parsed_output
    assert isinstance(person, Person) and person.name
    assert reply.stop_reason == "end_turn"
