"""The bare hops: GPU Torrent's request path with none of its work, the floor of added latency on a machine.

A benchmark reference, never a way to run a pool. A relay takes a request over HTTP, pushes it
onto a Redis list, and answers with what comes back; a worker pops it, sends it to the backend,
and hands the reply back through Redis. That is the path of a request through GPU Torrent (client
to coordinator, Redis to worker, worker to backend, Redis back to the coordinator), on the same
HTTP server (uvicorn with httptools and uvloop) and the same Redis calls: a non-streamed reply comes
back by PUBLISH, a stream through a Redis Stream read with a blocking XREAD. It does nothing else:
no authentication, no validation of the body (the bytes are forwarded as they are), no routing,
no admission, no accounting, no leases. What B1 and the streaming benchmark measure for it is
what the hops alone add on the machine of the run. `relay-fastapi` puts the same relay behind one
FastAPI route that validates the body: the hops plus the framework's own cost, the floor for any
coordinator built on FastAPI, as GPU Torrent's is.

    python bench/bare_relay.py relay REDIS_PORT PORT          (raw ASGI on uvicorn)
    python bench/bare_relay.py relay-fastapi REDIS_PORT PORT  (the same behind one FastAPI route)
    python bench/bare_relay.py worker REDIS_PORT BACKEND_PORT RELAY_PORT
"""

import asyncio
import collections
import contextlib
import functools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hiredis
import httptools
import uvloop


def names(relay_port: int) -> tuple[bytes, bytes, bytes]:
    """The job list, the results channel and the streams' prefix of the relay on `relay_port`: two
    relays on one Redis keep to their own."""
    prefix = b"bare:%d:" % relay_port
    return prefix + b"jobs", prefix + b"results", prefix + b"stream:"


STREAM_END = b"end"  # the field of a stream's last entry
Reply = Any  # what hiredis parses: bytes, int, list, ...


class RedisConnection(asyncio.Protocol):
    """One Redis connection: commands pipelined, replies handed out in order; pushes go to `on_message`."""

    def __init__(self, on_message: Callable[[bytes], None] | None = None) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self.on_message = on_message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if self.on_message is not None and isinstance(reply, list) and reply[0] == b"message":
                self.on_message(reply[2])
            else:
                self.waiting.popleft().set_result(reply)

    def call(self, *args: bytes | str | int) -> asyncio.Future[Reply]:
        reply = asyncio.get_running_loop().create_future()
        self.waiting.append(reply)
        self.transport.write(hiredis.pack_command(args))
        return reply


async def connect(port: int, on_message: Callable[[bytes], None] | None = None) -> RedisConnection:
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(lambda: RedisConnection(on_message), "127.0.0.1", port)
    return connection


class BackendConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection to the backend; the reply's body goes to the caller's
    `body_received` as it comes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body_received(body)

    def on_message_complete(self) -> None:
        self.done.set_result(None)

    def post(self, path: bytes, body: bytes, body_received: Callable[[bytes], None]) -> asyncio.Future[None]:
        self.body_received = body_received
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        head = b"POST %s HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        self.transport.write(head % (path, len(body)) + body)
        return self.done


async def worker(redis_port: int, backend_port: int, relay_port: int) -> None:
    """Pop a job, send its body to the backend, hand the reply back: whole by PUBLISH, or streamed by
    XADD. One job at a time: the benchmarks that use it send one request at a time."""
    jobs_list, results_channel, streams = names(relay_port)
    jobs, results = await connect(redis_port), await connect(redis_port)
    _, backend = await asyncio.get_running_loop().create_connection(BackendConnection, "127.0.0.1", backend_port)
    while True:
        _, job = await jobs.call("BLPOP", jobs_list, 0)
        request_id, stream, path, body = job.split(b"|", 3)
        if stream == b"1":
            stream_key = streams + request_id
            await backend.post(path, body, functools.partial(results.call, "XADD", stream_key, "*", "d"))
            results.call("XADD", stream_key, "*", STREAM_END, b"")
        else:
            reply: list[bytes] = []
            await backend.post(path, body, reply.append)
            results.call("PUBLISH", results_channel, request_id + b"|" + b"".join(reply))


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Relay:
    """The relay as a raw ASGI app: no framework, no middleware."""

    def __init__(self, redis_port: int, port: int) -> None:
        self.redis_port = redis_port
        self.jobs, self.results, self.streams = names(port)
        self.readers: list[RedisConnection] = []  # idle connections for blocking stream reads
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["method"] == "GET":  # up and connected: what `bench/pool.py` waits for
            return await self.reply(send, "text/plain", b"ready")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream = b'"stream":true' in body.replace(b" ", b"")  # a look at the bytes: the relay parses no JSON
        await self.forward(scope["path"], body, stream, send)

    async def forward(self, path: str, body: bytes, stream: bool, send: Send) -> None:
        """Hand the request to the worker through Redis and send its answer, whole or streamed."""
        request_id = os.urandom(8).hex().encode()
        job = b"|".join((request_id, b"1" if stream else b"0", path.encode(), body))
        if not stream:  # waited for before the job goes: its reply may come ahead of the LPUSH's own
            answer = self.waiting[request_id] = asyncio.get_running_loop().create_future()
        await self.commands.call("LPUSH", self.jobs, job)
        if stream:
            return await self.streamed(request_id, send)
        await self.reply(send, "application/json", await answer)

    async def start(self) -> None:
        self.commands = await connect(self.redis_port)
        self.announcements = await connect(self.redis_port, self.announced)
        await self.announcements.call("SUBSCRIBE", self.results)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while (await receive())["type"] == "lifespan.startup":
            await self.start()
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    def announced(self, message: bytes) -> None:
        request_id, reply = message.split(b"|", 1)
        if (waiter := self.waiting.pop(request_id, None)) is not None:
            waiter.set_result(reply)

    @staticmethod
    async def reply(send: Send, content_type: str, body: bytes) -> None:
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def streamed(self, request_id: bytes, send: Send) -> None:
        reader = self.readers.pop() if self.readers else await connect(self.redis_port)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        stream_key, last_id = self.streams + request_id, b"0"
        try:
            while True:
                [[_, entries]] = await reader.call("XREAD", "BLOCK", 0, "STREAMS", stream_key, last_id)
                for _, (field, chunk) in entries:
                    if field == STREAM_END:
                        return await send({"type": "http.response.body", "body": b""})
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last_id = entries[-1][0]
        finally:
            self.readers.append(reader)
            self.commands.call("DEL", stream_key)


def on_fastapi(relay: Relay) -> Any:
    """The same relay behind one FastAPI route that validates the body as a chat completion: the bare
    hops plus what the framework alone costs (no middleware, no authentication, the body forwarded as
    it came). This module has no `from __future__ import annotations`: FastAPI reads the route's
    annotations, and these models are local."""
    from fastapi import FastAPI, Request
    from pydantic import BaseModel
    from starlette.responses import Response

    class Message(BaseModel):
        role: str
        content: str

    class ChatCompletion(BaseModel):
        model: str
        messages: list[Message]
        max_tokens: int | None = None
        stream: bool = False

    class Forwarded(Response):
        def __init__(self, path: str, body: bytes, stream: bool) -> None:
            self.path, self.body, self.stream = path, body, stream
            self.background = None

        async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
            await relay.forward(self.path, self.body, self.stream, send)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await relay.start()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1")
    async def ready() -> str:
        return "ready"

    @app.post("/v1/chat/completions")
    async def chat_completions(completion: ChatCompletion, request: Request) -> Response:
        return Forwarded(request.url.path, await request.body(), completion.stream)

    return app


if __name__ == "__main__":
    role, redis_port, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if role == "worker":
        uvloop.run(worker(redis_port, port, int(sys.argv[4])))
    else:
        import uvicorn

        app = Relay(redis_port, port) if role == "relay" else on_fastapi(Relay(redis_port, port))
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
