"""Ollama's wire format (`/api/*`): tolerant request models and pure functions to and from ours.

Requests accept every field Ollama clients send. Those we cannot honour and whose loss leaves the
answer's meaning intact are ignored: `keep_alive`, `think`, `template`, `context`, and every
option but the five below. What would change the meaning is refused with a 400 that says
why: images, a non-empty `tools` list (Ollama answers the same for a model without tool support),
a `suffix` (fill-in-the-middle), and `tool` messages.

How requests map to ours:
- `POST /api/generate` applies the model's chat template, as Ollama does: `system` and `prompt`
  become a system and a user message. With `"raw": true` the prompt goes to the model as it is
  (a plain completion) and `system` is ignored, as in Ollama.
- options: `num_predict` → `max_tokens`. Absent or below 1 (Ollama's -1 "unlimited", -2 "fill the
  context") it is the pool's default, `InferenceOptions.max_tokens`; above `MAX_TOKENS` it
  is lowered to it. `temperature`, `top_p` and `stop` map as they are; a negative `seed` (Ollama's
  "random") is no seed.
- `format`: `"json"` or a JSON Schema, as in Ollama: the worker's backend constrains the output to
  it (see `InferenceOptions.format`). An empty string is no format; any other string is refused.
- An empty `prompt` and `system` (generate) or no messages (chat) is Ollama's "load the model":
  the answer is `done_reason: "load"` once a live worker serves the model. Workers keep their model
  loaded while they run, so `keep_alive: 0` unloads nothing and also answers "load".
- A model name without a tag also finds a worker serving `name:latest`, and the reverse, as
  Ollama's default tag does. Replies echo the name as the client wrote it.

How our results map to Ollama's (durations in nanoseconds, from the job's timings):
- `load_duration`: the time the job waited in its worker's queue (Ollama's also covers waiting
  for a runner); `eval_duration`: the whole generation; `prompt_eval_duration`: 0, as workers do
  not time prompt evaluation apart; `total_duration`: queue wait plus generation.
- `context` (generate, not raw): always `[]`; the pool keeps no conversation state.
- `/api/tags`, `/api/ps`, `/api/show`: the coordinator never sees model files, so `size` and
  `size_vram` are 0, `details` holds empty strings and `digest` is the SHA-256 of the name (a
  stable id, 64 hex digits like Ollama's: its CLI prints the first 12). `modified_at` is when the
  earliest live worker serving the model registered; `expires_at` is far in the future (Ollama's
  "Forever"). `/api/ps` and `/api/show` add a non-standard `workers`: the live workers serving it.
- `/api/pull` pulls onto the workers that can (see coordinator/pulls.py): each worker's progress
  lines, as its Ollama writes them, carry a non-standard `worker`; the lines about one worker's
  pull as a whole are never `success`, which clients take for the end of the whole pull.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any, Literal

from gputorrent.coordinator.adapters._common import Tolerant, dotted, validated
from gputorrent.errors import InvalidRequest, ModelNotFound
from gputorrent.protocol import (
    MAX_TOKENS,
    MODEL_NAME_PATTERN,
    EmbeddingRequest,
    ErrorInfo,
    InferenceRequest,
    JobResult,
    PullProgress,
    Text,
    WorkerState,
)

FOREVER = "2318-01-01T00:00:00Z"  # an `expires_at` Ollama's CLI shows as "Forever" (over 20 years away)
DEFAULT_TAG = ":latest"
_NANOS_PER_MS = 1_000_000
_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


class Options(Tolerant):
    """Ollama's `options`: the ones we map; the rest (`top_k`, `num_ctx`, ...) are accepted and ignored."""

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None


class Message(Tolerant):
    role: Text
    content: str | None = None
    images: list[Any] | None = None


class _Generation(Tolerant):
    model: Text  # echoed in replies and errors, so it must encode
    options: Options | None = None
    format: str | dict[str, Any] | None = None
    stream: bool | None = None  # absent or null means true: Ollama streams by default


class ChatRequest(_Generation):
    """The body of `POST /api/chat`."""

    messages: list[Message] | None = None
    tools: list[Any] | None = None


class GenerateRequest(_Generation):
    """The body of `POST /api/generate`."""

    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    images: list[Any] | None = None
    raw: bool | None = None


class ModelRequest(Tolerant):
    """The body of `POST /api/show` and `POST /api/pull`; `name` is the deprecated spelling of `model`."""

    model: Text | None = None
    name: Text | None = None
    stream: bool | None = None


class PullRequest(ModelRequest):
    """The body of `POST /api/pull`: `insecure` lets the workers' backends reach the registry without
    TLS checks, as Ollama's does."""

    insecure: bool | None = None


class EmbedRequest(Tolerant):
    """The body of `POST /api/embed`: one text or several."""

    model: Text
    input: Text | list[Text]


class LegacyEmbeddingsRequest(Tolerant):
    """The body of the older `POST /api/embeddings`: one text, as `prompt`."""

    model: Text
    prompt: Text


def embed_to_request(model: str, texts: str | list[str]) -> EmbeddingRequest:
    return validated(EmbeddingRequest, {"model": model, "input": [texts] if isinstance(texts, str) else texts})


def embed_reply(result: JobResult) -> dict[str, Any]:
    """`/api/embed`'s answer: the vectors, the tokens read, durations in nanoseconds."""
    queued = round(result.timings.queued_ms * _NANOS_PER_MS)
    working = round(result.timings.inference_ms * _NANOS_PER_MS)
    return {
        "model": result.model,
        "embeddings": result.embeddings or [],
        "total_duration": queued + working,
        "load_duration": queued,
        "prompt_eval_count": result.usage.prompt_tokens,
    }


def streaming(body: _Generation | ModelRequest) -> bool:
    """Ollama streams unless the request says `"stream": false`."""
    return body.stream is not False


def requested_model(body: ModelRequest) -> str:
    name = body.model or body.name
    if not name:
        raise InvalidRequest("model is required", param="model")
    return name


def pulled_model(body: PullRequest) -> str:
    """The name a pull asks for: a model name as a worker could register it."""
    name = requested_model(body)
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise InvalidRequest("model: a model name is 1 to 256 characters, without whitespace", param="model")
    return name


def pull_progress(worker_id: str, progress: PullProgress) -> dict[str, Any]:
    """A progress line of one worker's pull as Ollama writes it, with the worker (`worker`, a field
    Ollama's clients ignore)."""
    return {**progress.model_dump(exclude_none=True), "worker": worker_id}


def pull_queued(worker_id: str) -> dict[str, Any]:
    """The first line of each worker's pull. Lines about a worker's pull as a whole are never
    `success`, which clients take for the end of the whole pull."""
    return {"status": f"queued on worker {worker_id}", "worker": worker_id}


def pull_ended(worker_id: str, error: ErrorInfo | None) -> dict[str, Any]:
    """The line that says how one worker's pull ended: it has the model now, or why not."""
    status = f"pull failed on worker {worker_id}: {error.message}" if error else f"pulled onto worker {worker_id}"
    return {"status": status, "worker": worker_id}


def _options(body: _Generation) -> dict[str, Any]:
    options, output_format = body.options or Options(), body.format or None
    if isinstance(output_format, str) and output_format != "json":
        raise InvalidRequest(f'invalid format {output_format!r}: expected "json" or a JSON schema', param="format")
    mapped: dict[str, Any] = {
        "temperature": options.temperature, "top_p": options.top_p, "stop": options.stop, "format": output_format,
    }  # fmt: skip
    if options.num_predict is not None and options.num_predict >= 1:
        mapped["max_tokens"] = min(options.num_predict, MAX_TOKENS)
    if options.seed is not None and options.seed >= 0:
        mapped["seed"] = options.seed
    return {k: v for k, v in mapped.items() if v is not None}


def _validated(data: dict[str, Any]) -> InferenceRequest:
    # Ollama's `format` sits at the top level, where ours sits under `options`.
    return validated(InferenceRequest, data, lambda loc: "format" if loc[:2] == ("options", "format") else dotted(loc))


def _refuse_images(images: list[Any] | None, where: str) -> None:
    if images:
        raise InvalidRequest("images are not supported: the pool serves text-only models", param=where)


def is_load(body: ChatRequest | GenerateRequest) -> bool:
    """Ollama's "load the model" request: no messages (chat), or no prompt and no system (generate)."""
    if isinstance(body, ChatRequest):
        return not body.messages
    return not body.prompt and not body.system


def chat_to_inference(body: ChatRequest) -> InferenceRequest:
    """A chat request as our `InferenceRequest`; images, tools and tool messages are refused."""
    if body.tools:
        raise InvalidRequest(f"model '{body.model}' does not support tools", param="tools")
    messages = []
    for i, message in enumerate(body.messages or []):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidRequest(f"role '{message.role}' is not supported", param=f"messages.{i}.role")
        _refuse_images(message.images, f"messages.{i}.images")
        messages.append({"role": role, "content": message.content or ""})
    return _validated({"model": body.model, "messages": messages, "options": _options(body), "stream": streaming(body)})


def generate_to_inference(body: GenerateRequest) -> InferenceRequest:
    """A generate request as our `InferenceRequest`: a chat of `system` and `prompt`, or the raw prompt."""
    _refuse_images(body.images, "images")
    if body.suffix:
        raise InvalidRequest(f"model '{body.model}' does not support insert", param="suffix")
    request: dict[str, Any] = {"model": body.model, "options": _options(body), "stream": streaming(body)}
    if body.raw:
        request["prompt"] = body.prompt or ""
    else:
        turns = [("system", body.system), ("user", body.prompt)]
        request["messages"] = [{"role": role, "content": text} for role, text in turns if text]
    return _validated(request)


def timestamp(unix_s: float) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`.

    >>> timestamp(0.5)
    '1970-01-01T00:00:00.500000Z'
    """
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


def stats(result: JobResult) -> dict[str, Any]:
    """The statistics of Ollama's final line: why it stopped, token counts, durations in nanoseconds."""
    queued = round(result.timings.queued_ms * _NANOS_PER_MS)
    generating = round(result.timings.inference_ms * _NANOS_PER_MS)
    return {
        "done_reason": result.finish_reason or "stop",
        "total_duration": queued + generating,
        "load_duration": queued,
        "prompt_eval_count": result.usage.prompt_tokens,
        "prompt_eval_duration": 0,
        "eval_count": result.usage.completion_tokens,
        "eval_duration": generating,
    }


def chat_chunk(model: str, created_at: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": created_at, "message": {"role": "assistant", "content": text}, "done": False}


def generate_chunk(model: str, created_at: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": created_at, "response": text, "done": False}


def chat_reply(model: str, created_at: str, result: JobResult, text: str) -> dict[str, Any]:
    """The last line of a stream (`text` empty) or the whole answer (`text` the output)."""
    return {**chat_chunk(model, created_at, text), "done": True, **stats(result)}


def generate_reply(model: str, created_at: str, result: JobResult, text: str, raw: bool) -> dict[str, Any]:
    """The last line of a stream (`text` empty) or the whole answer; `context` unless raw, as Ollama."""
    reply = {**generate_chunk(model, created_at, text), "done": True, **stats(result)}
    return reply if raw else {**reply, "context": []}


def load_reply(body: ChatRequest | GenerateRequest, created_at: str) -> dict[str, Any]:
    """The answer to a "load the model" request."""
    if isinstance(body, ChatRequest):
        reply = chat_chunk(body.model, created_at, "")
    else:
        reply = generate_chunk(body.model, created_at, "")
    return {**reply, "done": True, "done_reason": "load"}


def resolve_model(name: str, served: list[str]) -> str | None:
    """The served model a client's name means: itself, or the same model with or without `:latest`.

    >>> resolve_model("llama3.2", ["llama3.2:latest"]), resolve_model("gemma3:latest", ["gemma3"])
    ('llama3.2:latest', 'gemma3')
    >>> resolve_model("llama3.2:1b", ["llama3.2:latest"]) is None
    True
    """
    if name in served:
        return name
    if name.endswith(DEFAULT_TAG):
        alias = name.removesuffix(DEFAULT_TAG)
    elif ":" not in name:
        alias = f"{name}{DEFAULT_TAG}"
    else:
        return None
    return alias if alias in served else None


def model_not_found(name: str, served: list[str]) -> ModelNotFound:
    """Ollama's wording ("not found", which clients look for before offering a pull), plus what is served."""
    hint = f"the live workers serve: {', '.join(served)}" if served else "no live worker serves any model"
    return ModelNotFound(f"model '{name}' not found; {hint}", available_models=served)


def _by_model(workers: list[WorkerState]) -> dict[str, list[WorkerState]]:
    """Each model live workers serve, with those workers, in name order."""
    serving: dict[str, list[WorkerState]] = {}
    for worker in workers:
        if worker.state == "alive":
            for model in worker.models:
                serving.setdefault(model, []).append(worker)
    return dict(sorted(serving.items()))


def _details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def _model_row(name: str, workers: list[WorkerState]) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(min(w.registered_at for w in workers)),
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(),
    }


def tags(workers: list[WorkerState]) -> dict[str, Any]:
    """`GET /api/tags`: the models live workers serve."""
    return {"models": [_model_row(name, serving) for name, serving in _by_model(workers).items()]}


def ps(workers: list[WorkerState]) -> dict[str, Any]:
    """`GET /api/ps`: the models loaded on live workers, each with the ids of those workers, and for a
    model split over machines its groups (GPU Torrent's own field: the leader, and its hosts' parts)."""
    models = []
    for name, serving in _by_model(workers).items():
        row = {k: v for k, v in _model_row(name, serving).items() if k != "modified_at"}
        groups = {w.worker_id: w.group.model_dump()["hosts"] for w in serving if w.group is not None}
        models.append({
            **row, "expires_at": FOREVER, "size_vram": 0, "workers": sorted(w.worker_id for w in serving),
            **({"groups": groups} if groups else {}),
        })  # fmt: skip
    return {"models": models}


def show(name: str, workers: list[WorkerState]) -> dict[str, Any]:
    """`POST /api/show` for a model some live worker serves (`name` as served).

    Raises:
        ModelNotFound: no live worker serves it.
    """
    serving = _by_model(workers).get(name)
    if not serving:
        raise model_not_found(name, list(_by_model(workers)))
    worker_ids = sorted(w.worker_id for w in serving)
    row = _model_row(name, serving)
    return {
        "modelfile": f"# served by GPU Torrent workers: {', '.join(worker_ids)}\nFROM {name}\n",
        "parameters": "",
        "template": "",
        "details": row["details"],
        "model_info": {},
        "capabilities": ["completion"],
        "modified_at": row["modified_at"],
        "workers": worker_ids,
    }


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    """Ollama's error shape: `{"error": "message"}`."""
    return {"error": message}


def error_line(message: str) -> dict[str, Any]:
    """A failure after a stream has begun: Ollama ends the stream with this line."""
    return {"error": message}
