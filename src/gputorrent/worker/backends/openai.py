"""Any OpenAI-compatible server (vLLM, llama.cpp's server, SGLang, TGI) through `/v1`."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from gputorrent.errors import BackendError, ModelUnavailable
from gputorrent.protocol import Embeddings, GenerationDone, Job, TokenChunk
from gputorrent.worker.backends._http import HTTPClient, error_text
from gputorrent.worker.backends.base import continued_chat


class OpenAIBackend:
    name = "openai"
    replays_exactly = False  # its server's cache and batching are not ours to control

    def __init__(self, *, base_url: str, api_key: str | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        server = f"the OpenAI-compatible server at {self._base_url}"
        self._http = HTTPClient(self._base_url, server=server, headers=headers)
        self._model = ""

    async def load(self, model: str | None) -> str:
        available = await self.list_models()
        if model is None:
            if not available:
                raise ModelUnavailable(f"the server at {self._base_url} lists no models")
            model = available[0]
        elif model not in available:
            served = ", ".join(available) or "nothing"
            raise ModelUnavailable(f"the server at {self._base_url} does not serve {model!r}; it serves {served}")
        self._model = model
        return model

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        """`/chat/completions` or `/completions`; streamed (SSE) when the job streams.

        A streamed reply carries usage only where the server honours `stream_options.include_usage`;
        elsewhere the completion tokens are counted one per content chunk and the prompt's are 0.
        A reply without usage (rare; some servers omit it) counts 0 tokens.
        """
        options = job.options
        body: dict[str, Any] = {
            "model": job.model,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            **({"seed": options.seed} if options.seed is not None else {}),
            **({"stop": options.stop} if options.stop else {}),
            **({"response_format": _response_format(options.format)} if options.format is not None else {}),
        }
        if job.messages is not None:
            path, body["messages"] = "/chat/completions", continued_chat(job)
        else:
            path, body["prompt"] = "/completions", (job.prompt or "") + (job.continuation or "")
        if not job.stream:
            reply = await self._call("POST", path, body)
            if not reply.get("choices"):
                raise BackendError(f"the OpenAI-compatible server answered without choices: {str(reply)[:200]}")
            choice = reply["choices"][0]
            yield TokenChunk(text=_choice_text(choice))
            yield _done(reply.get("usage"), choice.get("finish_reason"), chunks=0)
            return
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        usage: dict[str, Any] | None = None
        finish_reason: str | None = None
        chunks = 0
        async with aclosing(self._events(path, body)) as events:
            async for event in events:
                if "error" in event:  # vLLM and llama.cpp's server report a failure mid-stream this way
                    raise BackendError(f"the OpenAI-compatible server failed mid-stream: {error_text(event)}")
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if text := _choice_text(choice):
                        chunks += 1
                        yield TokenChunk(text=text)
                    finish_reason = choice.get("finish_reason") or finish_reason
        yield _done(usage, finish_reason, chunks)

    async def _events(self, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        """The JSON events of a server-sent-events reply, up to `[DONE]`."""
        async with self._http.stream_lines("POST", path, body) as lines:
            async for raw in lines:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    await lines.finish()
                    return
                try:
                    event = json.loads(data)
                except ValueError as e:
                    raise BackendError(f"{self._http.server} streamed an event that is not JSON") from e
                yield event

    async def embed(self, job: Job) -> Embeddings:
        """`/embeddings`, as floats."""
        body = {"model": job.model, "input": job.input or [], "encoding_format": "float"}
        reply = await self._call("POST", "/embeddings", body)
        data = sorted(reply.get("data", []), key=lambda item: int(item.get("index", 0)))
        usage = reply.get("usage") or {}
        return Embeddings(
            vectors=[item["embedding"] for item in data], prompt_tokens=int(usage.get("prompt_tokens", 0))
        )

    async def list_models(self) -> list[str]:
        reply = await self._call("GET", "/models")
        return [str(m["id"]) for m in reply.get("data", [])]

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._http.request_json(method, path, body)


def _choice_text(choice: dict[str, Any]) -> str:
    """Text of a chat choice (`message` or streamed `delta`) or a completion choice (`text`)."""
    message = choice.get("message") or choice.get("delta") or {}
    return str(message.get("content") or choice.get("text") or "")


def _done(usage: dict[str, Any] | None, finish_reason: str | None, chunks: int) -> GenerationDone:
    usage = usage or {}
    return GenerationDone(
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", chunks)),
        finish_reason=finish_reason or "stop",
    )


def _response_format(output_format: str | dict[str, Any]) -> dict[str, Any]:
    """`InferenceOptions.format` as OpenAI's `response_format` (llama.cpp's server and vLLM read it too)."""
    if output_format == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": output_format}}
