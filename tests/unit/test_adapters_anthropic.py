"""Anthropic's Messages wire format to and from ours: the pure functions of adapters/anthropic.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gputorrent.coordinator.adapters import anthropic as wire
from gputorrent.errors import InvalidRequest
from gputorrent.protocol import InferenceOptions, JobResult, Usage


def _request(**fields: Any) -> wire.MessagesRequest:
    body: dict[str, Any] = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return wire.MessagesRequest.model_validate({**body, **fields})


def _refusal(**fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        wire.to_inference(_request(**fields))
    return caught.value


def test_a_request_becomes_an_inference_request_with_its_options() -> None:
    request = wire.to_inference(
        _request(temperature=0.2, top_p=0.5, stop_sequences=["\n\nHuman:"], stream=True, max_tokens=7)
    )
    assert request.model == "m"
    assert [(m.role, m.content) for m in request.messages or []] == [("user", "hi")]
    assert request.options == InferenceOptions(max_tokens=7, temperature=0.2, top_p=0.5, stop=["\n\nHuman:"])
    assert request.stream is True


def test_a_temperature_above_anthropics_range_is_refused_by_name() -> None:
    assert wire.to_inference(_request(temperature=1.0)).options.temperature == 1.0
    refused = _refusal(temperature=1.5)
    assert refused.details["param"] == "temperature" and "between 0 and 1" in refused.message


def test_output_config_format_becomes_the_jobs_format() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    config = {"format": {"type": "json_schema", "schema": schema}, "effort": "low"}
    assert wire.to_inference(_request(output_config=config)).options.format == schema
    assert wire.to_inference(_request(output_config={"effort": "low"})).options.format is None
    unencodable = {"format": {"type": "json_schema", "schema": {"title": "\ud800"}}}
    assert _refusal(output_config=unencodable).details["param"] == "output_config.format.schema"


def test_unset_sampling_options_keep_our_defaults() -> None:
    options = wire.to_inference(_request()).options
    assert (options.temperature, options.top_p, options.stop) == (InferenceOptions().temperature, 0.95, [])


@pytest.mark.parametrize("system", ["be brief", [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]])
def test_system_becomes_the_first_message(system: Any) -> None:
    messages = wire.to_inference(_request(system=system)).messages or []
    assert [(m.role, m.content) for m in messages] == [("system", "be brief"), ("user", "hi")]


@pytest.mark.parametrize("system", ["", []])
def test_an_empty_system_adds_no_message(system: Any) -> None:
    assert [m.role for m in wire.to_inference(_request(system=system)).messages or []] == ["user"]


def test_text_blocks_are_joined_and_turns_keep_their_roles() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "three", "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "four"},
    ]
    converted = wire.to_inference(_request(messages=messages)).messages or []
    assert [(m.role, m.content) for m in converted] == [("user", "one two"), ("assistant", "three"), ("user", "four")]


def test_fields_we_do_not_use_are_ignored() -> None:
    request = wire.to_inference(
        _request(metadata={"user_id": "u"}, top_k=5, thinking={"type": "disabled"}, tool_choice={"type": "auto"})
    )
    assert request.options.max_tokens == 16


def test_a_non_text_block_is_refused_naming_it() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    error = _refusal(messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, image]}])
    assert "only text content blocks are supported, not 'image'" in error.message
    assert error.details["param"] == "messages.0.content.1.type"


def test_a_non_text_system_block_is_refused() -> None:
    assert _refusal(system=[{"type": "image"}]).details["param"] == "system.0.type"


def test_a_system_role_in_messages_is_refused_with_a_hint() -> None:
    error = _refusal(messages=[{"role": "system", "content": "x"}])
    assert "top-level `system`" in error.message
    assert error.details["param"] == "messages.0.role"


def test_tools_are_refused_but_an_empty_list_is_not() -> None:
    assert _refusal(tools=[{"name": "f", "input_schema": {"type": "object"}}]).details["param"] == "tools"
    assert wire.to_inference(_request(tools=[])).model == "m"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_sequences": ["x"] * 17}, "stop_sequences"),
        ({"model": "has space"}, "model"),
        ({"system": "\ud800", "messages": [{"role": "user", "content": "ok"}]}, "system"),
        (
            {"system": "s", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}]},
            "messages.1.content",
        ),
    ],
)
def test_out_of_range_values_are_refused_in_the_requests_own_field_names(fields: dict[str, Any], param: str) -> None:
    error = _refusal(**fields)
    assert error.details["param"] == param
    assert error.message.startswith(f"{param}: ")


def test_max_tokens_is_required() -> None:
    with pytest.raises(ValidationError) as caught:
        wire.MessagesRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert caught.value.errors()[0]["loc"] == ("max_tokens",)


def test_max_tokens_above_the_ceiling_is_lowered_to_it() -> None:
    assert wire.to_inference(_request(max_tokens=64000)).options.max_tokens == wire.MAX_TOKENS


def test_the_ceiling_is_the_protocols_own() -> None:
    assert InferenceOptions(max_tokens=wire.MAX_TOKENS).max_tokens == wire.MAX_TOKENS
    with pytest.raises(ValidationError):
        InferenceOptions(max_tokens=wire.MAX_TOKENS + 1)


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("length", "max_tokens"),
        ("stop", "end_turn"),
        (None, "end_turn"),
        ("stop_sequence", "stop_sequence"),
        ("something_new", "end_turn"),
    ],
)
def test_finish_reasons_map_to_stop_reasons(finish_reason: str | None, stop_reason: str) -> None:
    assert wire.stop_reason(finish_reason) == stop_reason


def _result(**fields: Any) -> JobResult:
    base: dict[str, Any] = {
        "request_id": "abc",
        "status": "completed",
        "model": "m",
        "worker_id": "w",
        "output": "hello",
        "finish_reason": "length",
        "usage": Usage(prompt_tokens=4, completion_tokens=2),
    }
    return JobResult.model_validate({**base, **fields})


def test_a_result_becomes_a_message() -> None:
    assert wire.message(_result()) == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 2},
    }


def test_an_empty_output_is_still_one_text_block() -> None:
    assert wire.message(_result(output=None))["content"] == [{"type": "text", "text": ""}]


def test_stream_events_have_anthropics_shapes() -> None:
    start = wire.message_start("abc", "m")
    assert start["type"] == "message_start"
    assert start["message"]["id"] == "msg_abc"
    assert (start["message"]["content"], start["message"]["stop_reason"]) == ([], None)
    assert wire.content_block_start() == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert wire.ping() == {"type": "ping"}
    assert wire.text_delta("Hi") == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"},
    }
    assert wire.content_block_stop() == {"type": "content_block_stop", "index": 0}
    assert wire.message_delta(_result(finish_reason="stop")) == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 4, "output_tokens": 2},
    }
    assert wire.message_stop() == {"type": "message_stop"}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (409, "invalid_request_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_bodies_have_anthropics_shape(status: int, kind: str) -> None:
    assert wire.error_body(status, "why", "code", "param") == {
        "type": "error",
        "error": {"type": kind, "message": "why"},
    }
