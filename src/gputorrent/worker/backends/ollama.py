"""Ollama over its REST API (`/api/tags`, `/api/pull`, `/api/generate`, `/api/chat`, `/api/embed`)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from gputorrent.errors import BackendError, ModelUnavailable
from gputorrent.protocol import Embeddings, GenerationDone, Job, PullProgress, TokenChunk
from gputorrent.worker.backends._http import HTTPClient
from gputorrent.worker.backends.base import continued_chat

log = logging.getLogger(__name__)


def same_model(wanted: str, listed: str) -> bool:
    """Ollama lists `llama3.2` as `llama3.2:latest`.

    >>> same_model("llama3.2", "llama3.2:latest"), same_model("llama3.2:1b", "llama3.2:latest")
    (True, False)
    """
    return listed == wanted or (":" not in wanted and listed == f"{wanted}:latest")


class OllamaBackend:
    name = "ollama"
    replays_exactly = False  # its server's cache and batching are not ours to control
    can_pull = True

    def __init__(self, *, host: str) -> None:
        self._host = host.rstrip("/")
        self._http = HTTPClient(self._host, server=f"Ollama at {self._host}")
        self._model = ""

    async def load(self, model: str | None) -> str:
        name = model or "llama3.2"
        if not any(same_model(name, listed) for listed in await self.list_models()):
            async for _ in self.pull(name):  # pull() logs its progress
                pass
        self._model = name
        return name

    async def pull(self, model: str, *, insecure: bool = False) -> AsyncGenerator[PullProgress]:
        """Ollama's `/api/pull`: its progress lines as they come; returns at its `success` line."""
        log.info("pulling %s through Ollama at %s", model, self._host)
        # No credentials travel with the pull: Ollama authenticates to registries (hf.co included)
        # with its own ed25519 key, registered with the registry account.
        body = {"model": model, "stream": True, **({"insecure": True} if insecure else {})}
        last_status = ""
        async with aclosing(self._stream("/api/pull", body, ModelUnavailable)) as lines:
            async for line in lines:
                if "error" in line:
                    raise ModelUnavailable(f"Ollama could not pull {model!r}: {line['error']}")
                status = str(line.get("status", ""))
                if status == "success":
                    return
                try:
                    progress = PullProgress.model_validate(line)
                except ValueError:  # a line a newer Ollama shapes otherwise: its progress is lost, not the pull
                    log.debug("pull %s: unreadable progress line %.200s", model, line)
                else:
                    yield progress
                if line.get("total") and line.get("completed") is not None:
                    status = f"{status} {100 * line['completed'] // line['total']}%"
                if status != last_status:
                    log.info("pull %s: %s", model, status)
                    last_status = status
        raise ModelUnavailable(
            f"Ollama's pull of {model!r} ended without success (last status: {last_status or 'none'})"
        )

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        """Ollama's `/api/chat` or `/api/generate`; streamed line by line when the job streams."""
        options = job.options
        body: dict[str, Any] = {
            "model": job.model,
            "stream": job.stream,
            "options": {
                "num_predict": options.max_tokens,
                "temperature": options.temperature,
                "top_p": options.top_p,
                **({"seed": options.seed} if options.seed is not None else {}),
                **({"stop": options.stop} if options.stop else {}),
            },
            **({"format": options.format} if options.format is not None else {}),
        }
        if job.messages is not None or job.continuation:
            # Ollama continues a final assistant message; /api/generate has no way to carry one.
            path, body["messages"] = "/api/chat", continued_chat(job)
        else:
            path, body["prompt"] = "/api/generate", job.prompt
        if not job.stream:
            reply = await self._call("POST", path, body)
            yield TokenChunk(text=_text(reply))
            yield _done(reply)
            return
        async with aclosing(self._stream(path, body, BackendError)) as lines:
            async for line in lines:
                if "error" in line:
                    raise BackendError(f"Ollama failed mid-generation: {line['error']}")
                if text := _text(line):
                    yield TokenChunk(text=text)
                if line.get("done"):
                    yield _done(line)
                    return
        raise BackendError("Ollama's stream ended before its final line")

    async def embed(self, job: Job) -> Embeddings:
        """Ollama's `/api/embed`."""
        reply = await self._call("POST", "/api/embed", {"model": job.model, "input": job.input or []})
        return Embeddings(vectors=reply.get("embeddings", []), prompt_tokens=int(reply.get("prompt_eval_count", 0)))

    async def list_models(self) -> list[str]:
        reply = await self._call("GET", "/api/tags")
        return [str(m["name"]) for m in reply.get("models", [])]

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._http.request_json(method, path, body)

    async def _stream(
        self, path: str, body: dict[str, Any], client_error: type[BackendError]
    ) -> AsyncGenerator[dict[str, Any]]:
        """The JSON objects of an NDJSON reply; a 4xx status is `client_error`, with Ollama's message."""
        async with self._http.stream_lines("POST", path, body, client_error) as lines:
            async for raw in lines:
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError as e:
                    raise BackendError(f"Ollama at {self._host} streamed a line that is not JSON") from e
                if line.get("done") or line.get("status") == "success":  # its last line: generation, pull
                    await lines.finish()
                yield line


def _text(line: dict[str, Any]) -> str:
    """The text of a `/api/generate` (`response`) or `/api/chat` (`message.content`) reply or line."""
    return str(line.get("response") or (line.get("message") or {}).get("content") or "")


def _done(line: dict[str, Any]) -> GenerationDone:
    return GenerationDone(
        prompt_tokens=int(line.get("prompt_eval_count", 0)),
        completion_tokens=int(line.get("eval_count", 0)),
        finish_reason=str(line.get("done_reason") or "stop"),
    )
