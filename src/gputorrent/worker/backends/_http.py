"""The HTTP/1.1 client both HTTP backends call their server with, every failure turned into a `BackendError`.

It is small on purpose: a call to the backend sits on every job's critical path, where aiohttp's
general-purpose client took half as long again as this one (docs/benchmarks.md, "Backend calls").
It speaks only what the backends need: JSON requests over keep-alive connections (http or https), replies framed by
Content-Length, chunked or the connection's close, read whole or line by line (SSE, NDJSON), after
any interim 1xx replies (100 Continue, 103 Early Hints), which are skipped.

A connection returns to the pool only once its reply was read to the end; one left early (a
stream its caller stopped, a cancelled job, a failure) is closed, so the server stops generating
and no half-read reply is ever read by the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from gputorrent.errors import BackendError, BackendUnavailable

# Connecting is bounded tightly; a reply may take minutes on a big model, but a server that
# accepts and then goes silent must not hold a slot forever.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # the longest silence while a reply is awaited or read
MAX_IDLE_CONNECTIONS = 32
END_GRACE_S = 0.05  # how long a stream read to its last line waits for its reply's end
PAUSE_READING_AT_BYTES = 1 << 20  # a reply read this far ahead of its caller stops reading the socket


class _Connection(asyncio.Protocol):
    """One connection and the reply being read on it, filled in by httptools' parser callbacks."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.lost = self._loop.create_future()  # done once the connection is closed, from either side
        self.failure: OSError | None = None  # why the reply cannot be read to its end
        self.in_use = False
        self.reset()

    def reset(self) -> None:
        """Ready for the next request on the same connection."""
        self.status = 0
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self.framed = False  # the reply's length is known (Content-Length or chunked), not read until close
        self.received_any = False
        self.body = bytearray()  # read, not yet taken by the caller
        if self._paused and self._transport is not None:
            self._transport.resume_reading()
            self._paused = False

    @property
    def reusable(self) -> bool:
        return self.done and self.keep_alive and not self.lost.done()

    def send(self, request: bytes) -> None:
        if self.lost.done() or self._transport is None:
            raise ConnectionResetError("the server closed the connection")
        self._transport.write(request)

    async def receive(self, timeout_s: float) -> None:
        """Wait for more of the reply: returns once bytes arrived or the connection closed."""
        if self.failure is not None:
            raise self.failure
        if self._paused and self._transport is not None:
            self._transport.resume_reading()
            self._paused = False
        waiter = self._waiter = self._loop.create_future()
        expiry = self._loop.call_later(timeout_s, _expire, waiter, timeout_s)
        try:
            await waiter
        finally:
            expiry.cancel()
            self._waiter = None

    async def read_to_end(self, timeout_s: float) -> None:
        """Wait until the whole reply is read (each silence bounded by `timeout_s`)."""
        while not self.done:
            await self.receive(timeout_s)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # bytes nobody asked for: the connection cannot be trusted with a next reply
            self.close()
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.failure = ConnectionError(f"the reply is not valid HTTP: {e}")
            self.close()
        if len(self.body) > PAUSE_READING_AT_BYTES and self._transport is not None and not self._paused:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_done and not self.done and not self.framed:
            self.done = True  # a reply without a length ends where the connection does
        if not self.done and self.failure is None:
            self.failure = ConnectionResetError(str(exc) if exc else "the server closed the connection")
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = not self._interim()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self._interim():  # the real reply follows on this connection
            self.status, self.framed = 0, False
            return
        # Asked here: the parser forgets the reply's Connection header once the callback returns.
        self.keep_alive = self._parser.should_keep_alive()
        self.done = True

    def _interim(self) -> bool:
        """An informational reply (100 Continue, 103 Early Hints): not the answer, which comes after it."""
        return 100 <= self.status < 200 and self.status != 101


def _expire(waiter: asyncio.Future[None], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"nothing received for {timeout_s:g} s"))


class HTTPClient:
    """Keep-alive JSON calls to one server (`base_url` may carry a path prefix, e.g. `http://host:8000/v1`).

    Each concurrent call has a connection of its own; idle ones are reused, up to `max_idle` kept.
    `server` names the server in error messages.
    """

    def __init__(
        self,
        base_url: str,
        *,
        server: str,
        headers: dict[str, str] | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_idle: int = MAX_IDLE_CONNECTIONS,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http or https URL: {base_url!r}")
        self.server = server
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        host = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None:
            host += f":{url.port}"
        lines = [f"Host: {host}", "User-Agent: gputorrent", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self._headers = "".join(line + "\r\n" for line in lines)

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send `body` as JSON and return the JSON object answered.

        Raises:
            BackendUnavailable: unreachable, or a 5xx status (with the server's own message).
            BackendError: a 4xx status, or a reply that is not JSON.
        """
        try:
            conn = await self._exchange(method, path, body)
            try:
                await conn.read_to_end(self._read_timeout_s)
                status, text = conn.status, bytes(conn.body)
            finally:
                self._release(conn)
        except OSError as e:
            raise self._unreachable(e) from e
        payload = _json_or_none(text)
        if status >= 400:
            raise self._status_error(status, text, payload, BackendError)
        if not isinstance(payload, dict):
            raise BackendError(f"{self.server} answered something that is not a JSON object: {_head(text)!r}")
        return payload

    @contextlib.asynccontextmanager
    async def stream_lines(
        self, method: str, path: str, body: dict[str, Any], client_error: type[BackendError] = BackendError
    ) -> AsyncIterator[Lines]:
        """Send `body` as JSON and iterate over the reply's lines as they arrive (SSE, NDJSON).

        Leaving the block before the reply's end closes the connection, so the server stops.

        Raises:
            BackendUnavailable: unreachable (also while lines are read), or a 5xx status.
            client_error: a 4xx status, with the server's message.
        """
        try:
            conn = await self._exchange(method, path, body)
        except OSError as e:
            raise self._unreachable(e) from e
        try:
            if conn.status >= 400:
                try:
                    await conn.read_to_end(self._read_timeout_s)
                except OSError as e:
                    raise self._unreachable(e) from e
                text = bytes(conn.body)
                raise self._status_error(conn.status, text, _json_or_none(text), client_error)
            yield Lines(conn, self._read_timeout_s, self._unreachable)
        finally:
            self._release(conn)

    async def close(self) -> None:
        """Close every connection, idle or in use (a call in flight fails as unreachable)."""
        connections, self._idle, self._open = list(self._open), [], set()
        for conn in connections:
            conn.close()
        await asyncio.gather(*(conn.lost for conn in connections))

    async def _exchange(self, method: str, path: str, body: dict[str, Any] | None) -> _Connection:
        """Send the request and read the reply's status line and headers; the connection is the caller's."""
        request = self._request(method, path, body)
        while self._idle:
            conn = self._idle.pop()
            if conn.lost.done():
                self._open.discard(conn)
                continue
            try:
                return await self._send(conn, request)
            except ConnectionError:
                # The server closed the idle connection as this request went out (its keep-alive
                # ran out): nothing of a reply came, so the request goes once more, on a new one.
                if conn.received_any:
                    raise
            break
        return await self._send(await self._connect(), request)

    async def _send(self, conn: _Connection, request: bytes) -> _Connection:
        conn.in_use = True
        try:
            conn.send(request)
            while not conn.head_done:
                await conn.receive(self._read_timeout_s)
        except BaseException:
            self._discard(conn)
            raise
        return conn

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> bytes:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._headers}"
        if body is None:
            return (head + "\r\n").encode()
        data = json.dumps(body).encode()
        return (head + f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(_Connection, self._host, self._port, ssl=self._ssl)
        except TimeoutError:
            raise TimeoutError(f"no connection within {self._connect_timeout_s:g} s") from None
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the pool if its reply was read to the end and it may be kept alive, else closed."""
        if conn.reusable and conn in self._open and len(self._idle) < self._max_idle:
            conn.in_use = False
            conn.reset()
            self._idle.append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    def _unreachable(self, e: OSError) -> BackendUnavailable:
        return BackendUnavailable(f"cannot reach {self.server}: {e or type(e).__name__}")

    def _status_error(self, status: int, text: bytes, payload: Any, client_error: type[BackendError]) -> BackendError:
        failure = BackendUnavailable if status >= 500 else client_error  # 5xx: another worker may do
        message = error_text(payload) if payload is not None else _head(text)
        return failure(f"{self.server} answered {status}: {message}")


class Lines:
    """The lines of a reply being read, each with its `\\n` (the last one may lack it)."""

    def __init__(
        self, conn: _Connection, read_timeout_s: float, unreachable: Callable[[OSError], BackendUnavailable]
    ) -> None:
        self._conn = conn
        self._read_timeout_s = read_timeout_s
        self._unreachable = unreachable
        self._scanned = 0  # bytes of conn.body already searched for a newline

    def __aiter__(self) -> Lines:
        return self

    async def finish(self) -> None:
        """The caller has the last line it reads (`[DONE]`, Ollama's final line): wait a moment for
        the reply's framing to end (it is usually in flight), so the connection is kept for the next
        call rather than closed, which would make that call connect anew."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(END_GRACE_S):
                await self._conn.read_to_end(self._read_timeout_s)

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            end = conn.body.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(conn.body[: end + 1])
                del conn.body[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(conn.body)
            if conn.done:
                if not conn.body:
                    raise StopAsyncIteration
                line = bytes(conn.body)
                conn.body.clear()
                return line
            try:
                await conn.receive(self._read_timeout_s)
            except OSError as e:
                raise self._unreachable(e) from e


def _json_or_none(text: bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _head(text: bytes) -> str:
    return text[:200].decode(errors="replace")


def error_text(payload: Any) -> str:
    """The message inside Ollama's `{"error": "..."}` or OpenAI's `{"error": {"message": ...}}`."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(payload)
