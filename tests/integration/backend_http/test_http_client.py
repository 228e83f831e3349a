"""The worker's backend HTTP client against real servers on 127.0.0.1: a scripted asyncio server that
answers the ways servers do (each test says how), and bench/fast_openai_server.py."""

from __future__ import annotations

import asyncio
import json
import runpy
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gputorrent.embedded import free_port
from gputorrent.errors import BackendError, BackendUnavailable, ModelUnavailable
from gputorrent.protocol import GenerationDone, InferenceOptions, Job, TokenChunk
from gputorrent.worker.backends._http import MAX_LINE_BYTES, HTTPClient
from gputorrent.worker.backends.openai import OpenAIBackend

BENCH = Path(__file__).parents[3] / "bench"
WAIT_S = 10.0  # a bound on waits for what the server sees; never reached when the client behaves


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    connection: int  # 1 for the first connection the server accepted, 2 for the next...


Answer = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer:
    """An HTTP/1.1 server whose `answer` writes each reply by hand, so a test can frame, stall or cut it."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[Request] = []
        self.connections = 0
        self._closed_by_client: dict[int, asyncio.Event] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def closed_by_client(self, connection: int) -> None:
        """Returns once the server has seen the client close that connection."""
        await asyncio.wait_for(self._closed_by_client[connection].wait(), WAIT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        closed = self._closed_by_client[connection] = asyncio.Event()
        try:
            while not writer.is_closing():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    closed.set()
                    return
                request_line, *header_lines = head.decode().split("\r\n")[:-2]
                method, path, _ = request_line.split(" ")
                headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = Request(method, path, headers, body, connection)
                self.requests.append(request)
                await self.answer(request, reader, writer)
                if reader.at_eof():
                    closed.set()
        except ConnectionError:
            closed.set()
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[ScriptedServer]]]:
    started: list[ScriptedServer] = []

    async def start(answer: Answer) -> ScriptedServer:
        server = ScriptedServer(answer)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., HTTPClient]]:
    made: list[HTTPClient] = []

    def make(base_url: str, **kwargs: Any) -> HTTPClient:
        client = HTTPClient(base_url, server="the test server", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def json_reply(payload: Any, status: int = 200, extra_headers: str = "") -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def answer_ok(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(json_reply({"path": request.path, "connection": request.connection}))


# Framing


def framed(framing: str, body: bytes) -> bytes:
    """A 200 reply carrying `body` in two pieces, framed by Content-Length, by chunks or by the close."""
    half = len(body) // 2
    if framing == "content-length":
        return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    if framing == "chunked":
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(body[:half])
            + chunk(body[half:])
            + b"0\r\n\r\n"
        )
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body


FRAMINGS = ["content-length", "chunked", "close"]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_json_reply_is_read_whole_however_it_is_framed(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient], framing: str
) -> None:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(framed(framing, json.dumps({"n": len(server.requests), "pad": "x" * 5000}).encode()))
        if framing == "close":
            writer.close()

    server = await serve(answer)
    client = make_client(server.url)
    assert (await client.request_json("POST", "/a", {"q": 1}))["n"] == 1
    assert (await client.request_json("POST", "/a", {"q": 2}))["n"] == 2
    # A reply read to its end leaves its connection for the next call, unless it ended with the connection.
    assert server.connections == (2 if framing == "close" else 1)


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_streamed_reply_comes_line_by_line_however_it_is_framed(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient], framing: str
) -> None:
    """Lines split across reads are joined; the last line may lack its newline."""

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(framed(framing, b'{"a": 1}\n{"b":' + b" 2}\n\n" + b'{"c": 3}'))
        if framing == "close":
            writer.close()

    server = await serve(answer)
    client = make_client(server.url)
    async with client.stream_lines("POST", "/api/generate", {"stream": True}) as lines:
        assert [line async for line in lines] == [b'{"a": 1}\n', b'{"b": 2}\n', b"\n", b'{"c": 3}']


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "lines"])
async def test_interim_1xx_replies_are_skipped_for_the_final_one(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient], stream: bool
) -> None:
    """A 100 Continue or 103 Early Hints (RFC 9110, 15.2) comes before the real reply, on the same connection."""

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the server's work: the interim replies arrive on their own, as they do
        writer.write(json_reply({"n": len(server.requests)}))

    server = await serve(answer)
    client = make_client(server.url)
    for n in (1, 2):  # and the connection is still good for the next call
        if stream:
            async with client.stream_lines("POST", "/a", {"q": n}) as lines:
                assert [json.loads(line) async for line in lines] == [{"n": n}]
        else:
            assert await client.request_json("POST", "/a", {"q": n}) == {"n": n}
    assert server.connections == 1


async def test_a_reply_larger_than_the_read_ahead_bound_is_read_whole(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    """Reading stops while the caller is over a MiB behind, and must resume (a pull's lines, an embedding batch)."""
    line = json.dumps({"status": "pulling", "pad": "x" * 1000}).encode() + b"\n"
    body = line * 4000  # about 4 MiB

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.path == "/lines":
            writer.write(framed("chunked", body))
        else:
            writer.write(json_reply({"lines": body.decode()}))

    server = await serve(answer)
    client = make_client(server.url)
    assert (await client.request_json("POST", "/json", {}))["lines"] == body.decode()
    async with client.stream_lines("POST", "/lines", {}) as lines:
        count = 0
        async for got in lines:
            assert got == line
            count += 1
    assert count == 4000 and server.connections == 1


# Requests


async def test_a_request_carries_host_path_prefix_json_and_the_api_key_and_asks_for_no_compression(
    serve: Callable[[Answer], Awaitable[ScriptedServer]],
) -> None:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.path == "/v1/models":
            writer.write(json_reply({"data": [{"id": "m"}]}))
        else:
            writer.write(json_reply({"data": [{"index": 0, "embedding": [0.5]}], "usage": {"prompt_tokens": 1}}))

    server = await serve(answer)
    backend = OpenAIBackend(base_url=f"{server.url}/v1/", api_key="sk-test")
    try:
        assert await backend.load("m") == "m"
        await backend.embed(_job(input=["hi"]))
    finally:
        await backend.close()

    listing, embedding = server.requests
    assert (listing.method, listing.path, listing.body) == ("GET", "/v1/models", b"")
    assert "content-length" not in listing.headers and "content-type" not in listing.headers
    assert (embedding.method, embedding.path) == ("POST", "/v1/embeddings")
    assert json.loads(embedding.body) == {"model": "m", "input": ["hi"], "encoding_format": "float"}
    assert embedding.headers["content-type"] == "application/json"
    assert embedding.headers["content-length"] == str(len(embedding.body))
    for request in server.requests:
        assert request.headers["host"] == f"127.0.0.1:{server.port}"
        assert request.headers["authorization"] == "Bearer sk-test"
        assert "accept-encoding" not in request.headers


# The pool


async def test_concurrent_calls_each_get_a_connection_and_idle_ones_are_reused(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    all_in = asyncio.Event()

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 3:
            all_in.set()
        await all_in.wait()  # the first three calls are in flight together
        writer.write(json_reply({"connection": request.connection}))

    server = await serve(answer)
    client = make_client(server.url)
    first = await asyncio.gather(*(client.request_json("POST", "/c", {}) for _ in range(3)))
    assert sorted(r["connection"] for r in first) == [1, 2, 3]
    # The three stay idle and serve the next three calls together.
    second = await asyncio.gather(*(client.request_json("POST", "/c", {}) for _ in range(3)))
    assert sorted(r["connection"] for r in second) == [1, 2, 3]
    assert server.connections == 3


@pytest.mark.parametrize("when", ["after its reply", "at the next request"])
async def test_a_kept_alive_connection_the_server_closed_is_replaced_and_the_call_succeeds(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient], when: str
) -> None:
    """Servers close idle connections when their keep-alive runs out; the client may or may not have
    noticed before it sends on one, and either way the call goes through on a new connection."""

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_on_connection = sum(r.connection == request.connection for r in server.requests) == 1
        if first_on_connection:
            writer.write(json_reply({"connection": request.connection}))  # no Connection: close
        if (when == "after its reply") or not first_on_connection:
            writer.close()

    server = await serve(answer)
    client = make_client(server.url)
    assert (await client.request_json("POST", "/k", {}))["connection"] == 1
    assert (await client.request_json("POST", "/k", {}))["connection"] == 2
    assert server.connections == 2


async def test_a_new_connection_closed_without_a_reply_fails_and_is_not_retried(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await serve(answer)
    client = make_client(server.url)
    with pytest.raises(BackendUnavailable, match="cannot reach the test server"):
        await client.request_json("POST", "/x", {"once": True})
    assert len(server.requests) == 1


async def test_a_reply_that_times_out_on_a_kept_alive_connection_is_not_sent_again(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    """The server has the request and may be running it: a timeout is never a stale connection."""

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            writer.write(json_reply({"first": True}))
        else:
            await reader.read()  # silent until the client gives up

    server = await serve(answer)
    client = make_client(server.url, read_timeout_s=0.2)
    await client.request_json("POST", "/t", {})
    with pytest.raises(BackendUnavailable, match=r"nothing received for 0\.2 s"):
        await client.request_json("POST", "/t", {})  # on the kept-alive connection
    assert len(server.requests) == 2


async def test_a_streamed_line_longer_than_the_bound_is_a_backend_error(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(framed("chunked", b"x" * (MAX_LINE_BYTES + 10) + b"\n"))

    server = await serve(answer)
    client = make_client(server.url)
    with pytest.raises(BackendError, match="sent a line longer than"):
        async with client.stream_lines("POST", "/long", {}) as lines:
            async for _ in lines:
                pass


# Timeouts and unreachable servers


@pytest.mark.parametrize("stall", ["before the head", "mid-body", "mid-stream"])
async def test_a_reply_that_stalls_longer_than_the_read_timeout_fails_and_its_connection_is_closed(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient], stall: str
) -> None:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if stall == "mid-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        elif stall == "mid-stream":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b'{"a": 1}\n'))
        await reader.read()  # silent until the client gives up

    server = await serve(answer)
    client = make_client(server.url, read_timeout_s=0.2)
    with pytest.raises(BackendUnavailable, match=r"cannot reach the test server: nothing received for 0.2 s"):
        if stall == "mid-stream":
            async with client.stream_lines("POST", "/s", {}) as lines:
                assert await anext(lines) == b'{"a": 1}\n'
                await anext(lines)
        else:
            await client.request_json("POST", "/s", {})
    await server.closed_by_client(1)


async def test_the_read_timeout_bounds_a_silence_not_the_whole_reply(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    gap_s, read_timeout_s = 0.1, 0.5

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(8):  # 0.8 s in all, more than the read timeout
            writer.write(chunk(f"{i}\n".encode()))
            await asyncio.sleep(gap_s)  # the server's pace, as a model generating tokens
        writer.write(b"0\r\n\r\n")

    server = await serve(answer)
    client = make_client(server.url, read_timeout_s=read_timeout_s)
    started = time.monotonic()
    async with client.stream_lines("POST", "/slow", {}) as lines:
        assert [line async for line in lines] == [f"{i}\n".encode() for i in range(8)]
    assert time.monotonic() - started > read_timeout_s


async def test_a_server_nobody_listens_on_is_unavailable(make_client: Callable[..., HTTPClient]) -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailable, match="cannot reach the test server"):
        await client.request_json("GET", "/models")
    with pytest.raises(BackendUnavailable, match="cannot reach the test server"):
        async with client.stream_lines("POST", "/api/pull", {}):
            pass


# Leaving early


async def test_a_stream_left_early_closes_its_connection_so_the_server_stops(
    serve: Callable[[Answer], Awaitable[ScriptedServer]],
) -> None:
    """The worker closes a job's generator when its client leaves; the backend must see it at once."""

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.connection == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'))
            await reader.read()  # generating, until the client goes
        else:
            writer.write(json_reply({"choices": [{"message": {"content": "again"}}], "usage": {}}))

    server = await serve(answer)
    backend = OpenAIBackend(base_url=f"{server.url}/v1")
    try:
        generation = backend.generate(_job(stream=True))
        assert await anext(generation) == TokenChunk(text="Hel")
        await generation.aclose()
        await server.closed_by_client(1)
        text, _ = [item async for item in backend.generate(_job(stream=False))]
        assert text == TokenChunk(text="again")
    finally:
        await backend.close()
    assert server.connections == 2


async def test_a_call_cancelled_mid_reply_leaves_no_half_read_connection_in_the_pool(
    serve: Callable[[Answer], Awaitable[ScriptedServer]], make_client: Callable[..., HTTPClient]
) -> None:
    half_sent = asyncio.Event()

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.connection == 1:
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{"connection": 1, ')
            await writer.drain()
            half_sent.set()
            await reader.read()
        else:
            writer.write(json_reply({"connection": request.connection}))

    server = await serve(answer)
    client = make_client(server.url)
    call = asyncio.create_task(client.request_json("POST", "/c", {}))
    await half_sent.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await server.closed_by_client(1)
    assert await client.request_json("POST", "/c", {}) == {"connection": 2}


# Status codes


@pytest.mark.parametrize(
    ("status", "body", "failure", "message"),
    [
        (400, {"error": {"message": "max_tokens is too large"}}, BackendError, "max_tokens is too large"),
        (404, {"error": "model 'x' not found"}, BackendError, "model 'x' not found"),
        (404, "404 page not found", BackendError, "404 page not found"),
        (503, {"error": {"message": "the engine is overloaded"}}, BackendUnavailable, "the engine is overloaded"),
    ],
)
async def test_a_4xx_is_a_backend_error_and_a_5xx_unavailable_with_the_servers_message(
    serve: Callable[[Answer], Awaitable[ScriptedServer]],
    make_client: Callable[..., HTTPClient],
    status: int,
    body: Any,
    failure: type[BackendError],
    message: str,
) -> None:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(body, str):
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        else:
            writer.write(json_reply(body, status))

    server = await serve(answer)
    client = make_client(server.url)
    with pytest.raises(BackendError) as called:
        await client.request_json("POST", "/e", {})
    assert type(called.value) is failure
    assert called.value.message == f"the test server answered {status}: {message}"

    # A stream's 4xx is the caller's own error (a pull's is ModelUnavailable); its 5xx the same as above.
    with pytest.raises(BackendError) as streamed:
        async with client.stream_lines("POST", "/e", {}, ModelUnavailable):
            pass
    assert type(streamed.value) is (ModelUnavailable if status < 500 else BackendUnavailable)
    assert streamed.value.message == called.value.message
    assert server.connections == 1  # an error reply read to its end leaves its connection reusable


# Real servers


@pytest.fixture
async def fast_server() -> AsyncIterator[str]:
    """bench/fast_openai_server.py in this event loop; its OpenAI base URL."""
    make_app = runpy.run_path(str(BENCH / "fast_openai_server.py"))["make_app"]
    runner = web.AppRunner(make_app(0.0), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1"
    await runner.cleanup()


async def test_the_openai_backend_completes_and_streams_every_token_from_the_fast_server(fast_server: str) -> None:
    backend = OpenAIBackend(base_url=fast_server)
    expected = "".join(f"t{i} " for i in range(16))
    try:
        for stream in (False, True, False, True):
            items = [item async for item in backend.generate(_job(stream=stream, max_tokens=16))]
            assert "".join(i.text for i in items if isinstance(i, TokenChunk)) == expected
            assert items[-1] == GenerationDone(prompt_tokens=1, completion_tokens=16, finish_reason="length")
        together = await asyncio.gather(*(_text(backend, stream=True) for _ in range(8)))
        assert together == [expected] * 8
    finally:
        await backend.close()


async def _text(backend: OpenAIBackend, *, stream: bool) -> str:
    return "".join(
        [i.text async for i in backend.generate(_job(stream=stream, max_tokens=16)) if isinstance(i, TokenChunk)]
    )


OPENSSL = shutil.which("openssl")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 and its key."""
    if OPENSSL is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_server_against_the_default_trust_store(
    make_client: Callable[..., HTTPClient], certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server = ScriptedServer(answer_ok)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    await server.start(context)
    try:
        https = f"https://127.0.0.1:{server.port}/v1"
        with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await make_client(https).request_json("GET", "/models")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the default context trusts what this names
        assert (await make_client(https).request_json("GET", "/models"))["path"] == "/v1/models"
    finally:
        await server.stop()


def _job(*, stream: bool = False, input: list[str] | None = None, max_tokens: int = 8) -> Job:
    return Job(
        request_id="r", worker_id="w", model="m", kind="embed" if input else "generate", input=input,
        messages=None if input else [{"role": "user", "content": "hi"}],  # type: ignore[list-item]
        options=InferenceOptions(max_tokens=max_tokens), enqueued_at=time.time(), stream=stream,
    )  # fmt: skip


async def test_a_stream_read_to_its_last_line_keeps_its_connection_for_the_next_job(
    serve: Callable[[Answer], Awaitable[ScriptedServer]],
) -> None:
    """A server writes the chunked reply's end after `[DONE]`, often in a packet of its own: the
    backend waits that moment rather than close the connection, so the next job need not connect."""

    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'))
        writer.write(chunk(b"data: [DONE]\n\n"))
        await writer.drain()
        await asyncio.sleep(0.005)  # the end of the reply, a little later (a server's last write)
        writer.write(b"0\r\n\r\n")

    server = await serve(answer)
    backend = OpenAIBackend(base_url=f"{server.url}/v1")
    try:
        for _ in range(2):
            items = [item async for item in backend.generate(_job(stream=True))]
            assert items[0] == TokenChunk(text="Hi")
    finally:
        await backend.close()
    assert server.connections == 1
