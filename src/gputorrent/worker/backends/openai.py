"""Any OpenAI-compatible server (vLLM, llama.cpp's server, SGLang, TGI) through `/v1`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gputorrent.errors import ModelUnavailable
from gputorrent.protocol import GenerationDone, Job, TokenChunk
from gputorrent.worker.backends._http import TIMEOUT, request_json


class OpenAIBackend:
    name = "openai"

    def __init__(self, *, base_url: str, api_key: str | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._model = ""

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT, headers=self._headers)
        return self._session

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

    async def generate(self, job: Job) -> AsyncIterator[TokenChunk | GenerationDone]:
        options = job.options
        body: dict[str, Any] = {
            "model": job.model,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            **({"seed": options.seed} if options.seed is not None else {}),
            **({"stop": options.stop} if options.stop else {}),
        }
        if job.messages is not None:
            body["messages"] = [m.model_dump() for m in job.messages]
            reply = await self._call("POST", "/chat/completions", body)
            choice = reply["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
        else:
            body["prompt"] = job.prompt
            reply = await self._call("POST", "/completions", body)
            choice = reply["choices"][0]
            text = choice.get("text") or ""
        usage = reply.get("usage") or {}
        yield TokenChunk(text=text)
        yield GenerationDone(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=str(choice.get("finish_reason") or "stop"),
        )

    async def list_models(self) -> list[str]:
        reply = await self._call("GET", "/models")
        return [str(m["id"]) for m in reply.get("data", [])]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        server = f"the OpenAI-compatible server at {self._base_url}"
        return await request_json(self._http(), method, self._base_url + path, body, server)
