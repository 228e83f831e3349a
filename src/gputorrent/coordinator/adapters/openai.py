"""OpenAI's wire format: tolerant request models and pure functions to and from ours.

Requests accept fields we do not use (OpenAI clients send many); they are ignored, not refused.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal

from pydantic import Field

from gputorrent.coordinator.adapters._common import Tolerant, dotted, validated
from gputorrent.errors import InvalidRequest
from gputorrent.protocol import EmbeddingRequest, InferenceRequest, JobResult

OWNED_BY = "gputorrent"


class StreamOptions(Tolerant):
    include_usage: bool = False


class ContentPart(Tolerant):
    type: str
    text: str | None = None


class Message(Tolerant):
    role: str
    content: str | list[ContentPart] | None = None


class _Sampling(Tolerant):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class JsonSchemaFormat(Tolerant):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # `schema` would shadow pydantic's


class ResponseFormat(Tolerant):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for the legacy completions endpoint


class EmbeddingsRequest(Tolerant):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"


_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


def _text_of(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"only text content is supported, not {part.type!r}", param=f"messages.{index}.content"
            )
        texts.append(part.text)
    return "".join(texts)


def _options(body: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    if body.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    given = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if body.stop is not None:
        options["stop"] = body.stop
    return options


def _validated(data: dict[str, Any]) -> InferenceRequest:
    return validated(InferenceRequest, data, _field_name)


def _field_name(loc: tuple[Any, ...]) -> str:
    # OpenAI's sampling fields sit at the top level, where ours sit under `options`; our `format` is
    # its `response_format`.
    name = dotted(loc).removeprefix("options.")
    return "response_format" if name == "format" else name


def chat_to_inference(body: ChatCompletionRequest) -> InferenceRequest:
    """A chat completion request as our `InferenceRequest` (tools, images and n>1 are refused)."""
    messages = []
    for i, message in enumerate(body.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidRequest(f"role {message.role!r} is not supported", param=f"messages.{i}.role")
        messages.append({"role": role, "content": _text_of(message, i)})
    max_tokens = body.max_completion_tokens or body.max_tokens
    options = {**_options(body, max_tokens), "format": _format(body.response_format)}
    return _validated({"model": body.model, "messages": messages, "options": options})


def _format(response_format: ResponseFormat | None) -> str | dict[str, Any] | None:
    """`response_format` as `InferenceOptions.format`."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "json"
    if response_format.json_schema is None:
        param = "response_format.json_schema"
        raise InvalidRequest(f"{param} is required when response_format.type is json_schema", param=param)
    schema = response_format.json_schema.schema_
    return "json" if schema is None else schema  # no schema: any JSON object, as llama.cpp's server reads it


def completion_to_inference(body: CompletionRequest) -> InferenceRequest:
    """A legacy completion request as our `InferenceRequest` (one prompt per request)."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest("exactly one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    return _validated({"model": body.model, "prompt": prompt, "options": _options(body, body.max_tokens)})


def embeddings_to_request(body: EmbeddingsRequest) -> EmbeddingRequest:
    """Texts only: token arrays are refused (workers tokenize with their own model)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(text, str) for text in texts):
        raise InvalidRequest(
            "input must be a string or a list of strings; token arrays are not supported", param="input"
        )
    return validated(EmbeddingRequest, {"model": body.model, "input": texts})


def embeddings(result: JobResult, encoding_format: str) -> dict[str, Any]:
    """The embeddings list; base64 is little-endian float32, as OpenAI encodes it."""
    data = []
    for index, vector in enumerate(result.embeddings or []):
        encoded: list[float] | str = vector
        if encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = result.usage.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def usage(result: JobResult) -> dict[str, int]:
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(result: JobResult, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.output or ""},
                "logprobs": None,
                "finish_reason": result.finish_reason or "stop",
            }
        ],
        "usage": usage(result),
    }


def completion(result: JobResult, created: int) -> dict[str, Any]:
    return {
        "id": f"cmpl-{result.request_id}",
        "object": "text_completion",
        "created": created,
        "model": result.model,
        "choices": [
            {"text": result.output or "", "index": 0, "logprobs": None, "finish_reason": result.finish_reason or "stop"}
        ],
        "usage": usage(result),
    }


def chat_chunk(
    request_id: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def completion_chunk(
    request_id: str, model: str, created: int, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(result: JobResult, created: int, object_name: str) -> dict[str, Any]:
    """The extra last chunk `stream_options.include_usage` asks for: no choices, the usage."""
    prefix = "chatcmpl" if object_name == "chat.completion.chunk" else "cmpl"
    return {
        "id": f"{prefix}-{result.request_id}",
        "object": object_name,
        "created": created,
        "model": result.model,
        "choices": [],
        "usage": usage(result),
    }


def models(names: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model(name) for name in names]}


def model(name: str) -> dict[str, Any]:
    """A model object; `created` is now, as the coordinator knows no creation time."""
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": OWNED_BY}


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    """OpenAI's error shape; `type` follows the status as OpenAI's does."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    elif status == 429:
        kind = "rate_limit_exceeded"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
