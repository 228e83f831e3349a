"""A stand-in for Ollama's documented REST protocol — NOT a real Ollama — for the tests of the
`ollama` backend and of pulls onto workers.

No Ollama binary can be installed where these tests run, so `OllamaProtocolStandin` is an aiohttp server
that answers the way Ollama's API reference (docs/api.md in ollama/ollama) says Ollama does:

- `GET /api/tags` lists local models as `{"models": [{"name": "llama3.2:latest", ...}]}`;
- `POST /api/pull` streams NDJSON progress: `pulling manifest`, then per layer `pulling <digest prefix>` with
  `digest` and `total`, then `completed` as it grows (the reference calls these lines `downloading
  <digest>`; Ollama's server writes `pulling` and the first 12 hex digits), `verifying sha256 digest`,
  `writing manifest`, `removing any unused layers`, `success`; or, for a model the registry does not have,
  an `{"error": ...}` line after the stream has begun. With `"stream": false` it answers the last object alone;
- `POST /api/generate` and `POST /api/chat` answer one object when `"stream": false` (`response` or
  `message`, `done`, `done_reason`, `prompt_eval_count`, `eval_count`, durations), an NDJSON stream otherwise,
  and 404 `{"error": "model 'x' not found"}` for a model that is not present.

The stand-in records every request so tests can assert on what was sent. Tests using it prove that
GPU Torrent speaks the documented protocol; they cannot prove a given Ollama release still matches it.
Start it in the test's event loop (`start`/`stop`), or on a thread of its own for tests that block on
synchronous clients (`standin_in_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

# What the stand-in "generates": a canned reply, cut to `num_predict` words (one word = one token here).
GENERATE_REPLY = "Paris is the capital of France."
CHAT_REPLY = "Hello! How can I help you today?"
PULL_NOT_FOUND = "pull model manifest: file does not exist"


def _tagged(name: str) -> str:
    """Ollama's name convention: the tag defaults to `latest` (docs/api.md, "Model names")."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass(frozen=True)
class Received:
    """One request as the stand-in saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class OllamaProtocolStandin:
    """An in-process server following Ollama's documented REST protocol. Not Ollama itself.

    `models` are present locally (listed by /api/tags); `registry` is what /api/pull can fetch, a model
    becoming present once its whole progress stream was sent. `pull_line_delay_s` paces that stream,
    as a download takes time (0: at once).
    """

    models: list[str] = field(default_factory=lambda: ["llama3.2:latest"])
    registry: set[str] = field(
        default_factory=lambda: {"qwen2.5:0.5b", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"}
    )
    pull_line_delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def requests_to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/chat", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        body = json.loads(await request.read()) if request.can_read_body else None
        self.received.append(Received(request.method, request.path, dict(request.headers), body))
        return await handler(request)  # type: ignore[no-any-return]

    def _present(self, name: str) -> bool:
        return _tagged(name) in self.models

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "modified_at": "2024-11-04T14:56:49.277302595-07:00",
                        "size": 2019393189,
                        "digest": uuid.uuid5(uuid.NAMESPACE_URL, name).hex * 2,
                        "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B"},
                    }
                    for name in self.models
                ]
            }
        )

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = body.get("model") or body.get("name")  # `name` is the older spelling
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        if name not in self.registry and _tagged(name) not in self.registry:
            # The stream has started (HTTP 200); a failure arrives as an error line, as Ollama does.
            lines.append({"error": PULL_NOT_FOUND})
        else:
            digest = "sha256:" + uuid.uuid5(uuid.NAMESPACE_URL, name).hex * 2
            total = 4_000
            lines.append({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total})
            lines += [
                {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": done}
                for done in (1_000, 2_500, total)
            ]
            lines += [
                {"status": s}
                for s in ("verifying sha256 digest", "writing manifest", "removing any unused layers", "success")
            ]
        if body.get("stream", True) is False:
            self._pulled(name, lines)
            return web.json_response(lines[-1])
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i, line in enumerate(lines):
            if i and self.pull_line_delay_s:
                await asyncio.sleep(self.pull_line_delay_s)  # the download's pace, not a wait for state
            await resp.write(json.dumps(line).encode() + b"\n")
        self._pulled(name, lines)
        await resp.write_eof()
        return resp

    def _pulled(self, name: str, lines: list[dict[str, Any]]) -> None:
        """The model of a pull whose every line was sent is present from now on."""
        if lines[-1] == {"status": "success"}:
            self.models.append(_tagged(name))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not self._present(body["model"]):
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        prompt_tokens = len(str(body.get("prompt", "")).split())
        return await self._answer(request, body, prompt_tokens, GENERATE_REPLY, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not self._present(body["model"]):
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        prompt_tokens = sum(len(m["content"].split()) for m in body.get("messages", []))
        return await self._answer(request, body, prompt_tokens, CHAT_REPLY, chat=True)

    async def _answer(
        self, request: web.Request, body: dict[str, Any], prompt_tokens: int, reply: str, *, chat: bool
    ) -> web.StreamResponse:
        words = reply.split()
        limit = int((body.get("options") or {}).get("num_predict", -1))
        kept = words if limit < 0 else words[:limit]
        done_reason = "length" if len(kept) < len(words) else "stop"
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(kept)]

        def frame(text: str, *, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": body["model"], "created_at": datetime.now(UTC).isoformat()}
            out |= {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            out["done"] = done
            if done:
                out |= {
                    "done_reason": done_reason,
                    "total_duration": 5_043_500_667,
                    "load_duration": 5_025_959,
                    "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": 325_953_000,
                    "eval_count": len(kept),
                    "eval_duration": 4_709_213_000,
                }
            return out

        if body.get("stream", True) is False:
            return web.json_response(frame("".join(pieces), done=True))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(json.dumps(frame(piece, done=False)).encode() + b"\n")
        await resp.write(json.dumps(frame("", done=True)).encode() + b"\n")
        await resp.write_eof()
        return resp


@contextlib.contextmanager
def standin_in_thread(**fields: Any) -> Iterator[OllamaProtocolStandin]:
    """A stand-in (made with `fields`) serving from a thread and event loop of its own, so a test may
    block on a synchronous client while worker processes call the stand-in."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ollama-standin", daemon=True)
    thread.start()
    standin = OllamaProtocolStandin(**fields)
    try:
        asyncio.run_coroutine_threadsafe(standin.start(), loop).result(timeout=10)
        yield standin
    finally:
        asyncio.run_coroutine_threadsafe(standin.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
