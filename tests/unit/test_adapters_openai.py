"""OpenAI's wire format: `response_format` as our `InferenceOptions.format`."""

from __future__ import annotations

from typing import Any

import pytest

from gputorrent.coordinator.adapters import openai as wire
from gputorrent.errors import InvalidRequest

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _chat(**fields: Any) -> wire.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return wire.ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, "json"),
        ({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}, SCHEMA),
        ({"type": "json_schema", "json_schema": {"name": "anything"}}, "json"),
    ],
)
def test_response_format_becomes_the_jobs_format(response_format: dict[str, Any] | None, expected: Any) -> None:
    assert wire.chat_to_inference(_chat(response_format=response_format)).options.format == expected


def test_a_json_schema_format_without_its_json_schema_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequest) as refused:
        wire.chat_to_inference(_chat(response_format={"type": "json_schema"}))
    assert refused.value.details["param"] == "response_format.json_schema"


def test_a_schema_that_cannot_be_written_as_utf8_is_refused_as_response_format() -> None:
    lone_surrogate = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"title": "\ud800"}}}
    with pytest.raises(InvalidRequest, match="lone surrogate") as refused:
        wire.chat_to_inference(_chat(response_format=lone_surrogate))
    assert refused.value.details["param"] == "response_format"
