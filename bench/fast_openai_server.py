"""A minimal OpenAI-compatible server that streams tokens at a set pace: the fast backend for benchmarks.

It generates nothing: token i of every reply is `t{i} `, so a client can check that no token
was lost or reordered. `python bench/fast_openai_server.py --port 8090 --gap-ms 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

MODEL = "fast"


def make_app(gap_ms: float) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        count = int(body.get("max_tokens") or 16)
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            text = "".join(f"t{i} " for i in range(count))
            choice = {"index": 0, "finish_reason": "length"}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
            return web.json_response({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(count):
            if i and gap_ms:
                await asyncio.sleep(gap_ms / 1000)
            piece = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
            event = {"id": "x", "created": int(time.time()), "model": MODEL, "choices": [{"index": 0, **piece}]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        done = {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}
        await resp.write(f"data: {json.dumps({'id': 'x', 'model': MODEL, 'choices': [done]})}\n\n".encode())
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        await resp.write(f"data: {json.dumps({'id': 'x', 'model': MODEL, 'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/completions", completion)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between tokens")
    args = parser.parse_args()
    web.run_app(make_app(args.gap_ms), host="127.0.0.1", port=args.port, print=None, access_log=None)
