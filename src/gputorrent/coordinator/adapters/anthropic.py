"""Anthropic's Messages API wire format: tolerant request models and pure functions to and from ours.

Requests accept the fields Anthropic clients send that we have no use for (`metadata`, `top_k`,
`thinking`, `tool_choice`, `service_tier`, `cache_control` on blocks, ...): they are ignored, not
refused. What would change the answer's meaning if ignored is refused with a 400 that names it:
content blocks other than text (images, documents, tool results) and a non-empty `tools` list (a
client that offers tools expects `tool_use` blocks we cannot produce). `output_config.format` (a
JSON schema, Anthropic's structured outputs) becomes the job's `format`, which the worker's backend
follows.

Known differences from Anthropic's API:
- `max_tokens` above `MAX_TOKENS` is lowered to it (Anthropic clients routinely ask for
  32k or 64k; no model a worker serves writes that much in one answer).
- `stop_sequence` is always null and a matched stop sequence reports `end_turn`: backends do not
  say which stop ended the generation.
- The answer always holds exactly one text block, possibly empty.
- `message_start` carries `input_tokens: 0`; the real count comes in `message_delta`, which the
  official SDKs fold into the final message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gputorrent.coordinator.adapters._common import Tolerant, validated
from gputorrent.errors import InvalidRequest
from gputorrent.protocol import MAX_TOKENS, InferenceRequest, JobResult

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}

ANTHROPIC_MAX_TEMPERATURE = 1.0  # Anthropic's range is 0 to 1 (ours, OpenAI's, goes to 2)

StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]

# Our finish reasons (OpenAI's names, as backends report them) as Anthropic's stop reasons.
_STOP_REASONS: dict[str, StopReason] = {"length": "max_tokens", "stop": "end_turn", "stop_sequence": "stop_sequence"}


class ContentBlock(Tolerant):
    type: str
    text: str | None = None


class Message(Tolerant):
    role: str
    content: str | list[ContentBlock]


class JsonOutputFormat(Tolerant):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")  # `schema` would shadow pydantic's


class OutputConfig(Tolerant):
    """Anthropic's `output_config`: the `format` the answer must follow (structured outputs); its
    `effort` is ignored."""

    format: JsonOutputFormat | None = None


class MessagesRequest(Tolerant):
    """The body of `POST /v1/messages`; `max_tokens` is required, as in Anthropic's API."""

    model: str
    max_tokens: int
    messages: list[Message] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[Any] | None = None
    output_config: OutputConfig | None = None


def _text_of(content: str | list[ContentBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type != "text":
            raise InvalidRequest(
                f"{where}.{j}: only text content blocks are supported, not {block.type!r}", param=f"{where}.{j}.type"
            )
        if block.text is None:
            raise InvalidRequest(f"{where}.{j}.text: a text block needs its text", param=f"{where}.{j}.text")
        texts.append(block.text)
    return "".join(texts)


def _field_name(loc: tuple[int | str, ...], has_system: bool) -> str:
    """Where an `InferenceRequest` validation error points, in the request's own field names."""
    parts = list(loc)
    if parts[:1] == ["options"]:
        parts = parts[1:]
        if parts[:1] == ["stop"]:
            parts[0] = "stop_sequences"
        elif parts[:1] == ["format"]:
            parts = ["output_config", "format", "schema"]
    elif parts[:1] == ["messages"] and has_system and len(parts) > 1 and isinstance(parts[1], int):
        parts = ["system"] if parts[1] == 0 else ["messages", parts[1] - 1, *parts[2:]]
    return ".".join(str(p) for p in parts)


def to_inference(body: MessagesRequest) -> InferenceRequest:
    """A Messages request as our `InferenceRequest`: `system` becomes a first system message.

    Raises:
        InvalidRequest: a non-text block, a role other than user/assistant, tools, or an option out of range.
    """
    if body.tools:
        raise InvalidRequest("tools are not supported: the workers cannot produce tool_use blocks", param="tools")
    messages: list[dict[str, str]] = []
    system = "" if body.system is None else _text_of(body.system, "system")
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        if message.role not in ("user", "assistant"):
            hint = "; use the top-level `system` parameter" if message.role == "system" else ""
            raise InvalidRequest(
                f"messages.{i}.role: unexpected role {message.role!r}, expected 'user' or 'assistant'{hint}",
                param=f"messages.{i}.role",
            )
        messages.append({"role": message.role, "content": _text_of(message.content, f"messages.{i}.content")})
    if body.temperature is not None and body.temperature > ANTHROPIC_MAX_TEMPERATURE:
        raise InvalidRequest("temperature: must be between 0 and 1", param="temperature")
    given = {"temperature": body.temperature, "top_p": body.top_p}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    options["max_tokens"] = min(body.max_tokens, MAX_TOKENS)
    options["stop"] = body.stop_sequences or []
    if body.output_config is not None and body.output_config.format is not None:
        options["format"] = body.output_config.format.schema_
    data = {"model": body.model, "messages": messages, "options": options, "stream": body.stream}
    return validated(InferenceRequest, data, lambda loc: _field_name(loc, bool(system)))


def stop_reason(finish_reason: str | None) -> StopReason:
    """Our finish reason as Anthropic's stop reason; anything unknown is a natural end of turn."""
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def usage(result: JobResult) -> dict[str, int]:
    return {"input_tokens": result.usage.prompt_tokens, "output_tokens": result.usage.completion_tokens}


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def message(result: JobResult) -> dict[str, Any]:
    """A completed result as Anthropic's `Message` object."""
    return {
        "id": message_id(result.request_id),
        "type": "message",
        "role": "assistant",
        "model": result.model,
        "content": [{"type": "text", "text": result.output or ""}],
        "stop_reason": stop_reason(result.finish_reason),
        "stop_sequence": None,
        "usage": usage(result),
    }


# The streamed events, in the order they are sent. Each is the `data:` of an SSE event whose
# `event:` name is its `type`.


def message_start(request_id: str, model: str) -> dict[str, Any]:
    """The first event: the message with no content yet; the token counts come in `message_delta`."""
    return {
        "type": "message_start",
        "message": {
            "id": message_id(request_id),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        },
    }


def content_block_start() -> dict[str, Any]:
    return {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


def ping() -> dict[str, Any]:
    return {"type": "ping"}


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def content_block_stop() -> dict[str, Any]:
    return {"type": "content_block_stop", "index": 0}


def message_delta(result: JobResult) -> dict[str, Any]:
    """The stop reason and the final token counts (input too: `message_start` could not know them)."""
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason(result.finish_reason), "stop_sequence": None},
        "usage": usage(result),
    }


def message_stop() -> dict[str, Any]:
    return {"type": "message_stop"}


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
