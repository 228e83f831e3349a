"""The HTTP client both HTTP backends call their server with (aiohttp), every failure turned into a `BackendError`.

The backends need JSON requests over keep-alive connections (http or https) and replies read whole
or line by line (SSE, NDJSON). This layer adds what aiohttp leaves to its caller:

- A connection returns to the pool only once its reply was read to the end; one left early (a
  stream its caller stopped, a cancelled job, a failure) is closed, so the server stops generating
  and no half-read reply is ever read by the next call.
- A kept-alive connection the server closed as the request went out (its keep-alive ran out) is
  retried on another, until the request goes out on a new one: aiohttp retries only idempotent
  methods, and every backend call but the model listing is a POST. A new connection closed without
  a reply, or a reply that timed out, is not retried (the server may have run the request).
- A silence longer than the read timeout, an unreachable server and a 5xx are `BackendUnavailable`
  (another worker may do); a 4xx is the caller's error, with the server's own message.

The worker once had an HTTP/1.1 client of its own here; the same-run benchmark then showed aiohttp
costing 0.1 ms more a call, under a tenth of what GPU Torrent adds to a request (docs/benchmarks.md,
"Backend calls"), so the maintained library does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from gputorrent.errors import BackendError, BackendUnavailable

# Connecting is bounded tightly; a reply may take minutes on a big model, but a server that
# accepts and then goes silent must not hold a slot forever.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # the longest silence while a reply is awaited or read
END_GRACE_S = 0.05  # how long a stream read to its last line waits for its reply's end
MAX_LINE_BYTES = 2 << 20  # a streamed line (an SSE event, Ollama's last line with its context) may be this long


class HTTPClient:
    """Keep-alive JSON calls to one server (`base_url` may carry a path prefix, e.g. `http://host:8000/v1`).

    Each concurrent call has a connection of its own; idle ones are kept for the next calls. `server`
    names the server in error messages. The session is made on the first call, in its event loop.
    """

    def __init__(
        self,
        base_url: str,
        *,
        server: str,
        headers: dict[str, str] | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http or https URL: {base_url!r}")
        self.server = server
        self._base = base_url.rstrip("/")
        self._https = url.scheme == "https"
        self._headers = {"User-Agent": "gputorrent", **(headers or {})}
        # `connect` bounds the name lookup too, `sock_connect` only the TCP connection.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send `body` as JSON and return the JSON object answered.

        Raises:
            BackendUnavailable: unreachable, or a 5xx status (with the server's own message).
            BackendError: a 4xx status, or a reply that is not JSON.
        """
        async with self._exchange(method, path, body) as resp:
            text = await self._read_whole(resp)
        payload = _json_or_none(text)
        if resp.status >= 400:
            raise self._status_error(resp.status, text, payload, BackendError)
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
        async with self._exchange(method, path, body) as resp:
            if resp.status >= 400:
                text = await self._read_whole(resp)
                raise self._status_error(resp.status, text, _json_or_none(text), client_error)
            yield Lines(resp, self)

    async def close(self) -> None:
        """Close every connection, idle or in use (a call in flight fails as unreachable)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The reply, its status line and headers read; released to the pool only if read to its end."""
        data, headers = None, None
        if body is not None:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        url = f"{self._base}{path}"
        while True:
            reused = SimpleNamespace(connection=False)
            try:
                resp = await self._open().request(
                    method, url, data=data, headers=headers, allow_redirects=False, trace_request_ctx=reused
                )
            except TimeoutError as e:  # silence or no connection in time: never sent again
                raise self._unreachable(e) from e
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # A kept-alive connection the server closed as the request went out (a write failed, or
                # it hung up before any reply): the request goes again, until one goes out on a new
                # connection (each failure spends one idle connection); on a new one it is not repeated.
                if reused.connection:
                    continue
                raise self._unreachable(e) from e
            except (aiohttp.ClientError, RuntimeError) as e:  # RuntimeError: the session was closed meanwhile
                raise self._unreachable(e) from e
            break
        try:
            yield resp
        finally:
            if not resp.content.is_eof():  # not read to its end: the connection goes, and the server sees it
                resp.close()
            resp.release()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            tracing = aiohttp.TraceConfig()
            tracing.on_connection_reuseconn.append(_note_reuse)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,  # one connection per call in flight; the worker's slots bound them
                    # Read when the session is made, so SSL_CERT_FILE and SSL_CERT_DIR apply.
                    ssl=ssl.create_default_context() if self._https else False,
                ),
                headers=self._headers,
                skip_auto_headers=("Accept-Encoding",),  # nothing to gain from compressing tokens on a LAN
                cookie_jar=aiohttp.DummyCookieJar(),  # a backend's cookies are not sent back
                timeout=self._timeout,
                read_bufsize=MAX_LINE_BYTES // 2,  # aiohttp reads a line up to twice its read buffer
                trace_configs=[tracing],
                auto_decompress=False,
            )
        return self._session

    async def _read_whole(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._unreachable(e) from e

    def _unreachable(self, e: BaseException) -> BackendUnavailable:
        if isinstance(e, aiohttp.ConnectionTimeoutError):
            return BackendUnavailable(f"cannot reach {self.server}: no connection within {self._connect_timeout_s:g} s")
        if isinstance(e, TimeoutError):
            return BackendUnavailable(f"cannot reach {self.server}: nothing received for {self._read_timeout_s:g} s")
        return BackendUnavailable(f"cannot reach {self.server}: {e or type(e).__name__}")

    def _status_error(self, status: int, text: bytes, payload: Any, client_error: type[BackendError]) -> BackendError:
        failure = BackendUnavailable if status >= 500 else client_error  # 5xx: another worker may do
        message = error_text(payload) if payload is not None else _head(text)
        return failure(f"{self.server} answered {status}: {message}")


async def _note_reuse(
    _: aiohttp.ClientSession, context: SimpleNamespace, __: aiohttp.TraceConnectionReuseconnParams
) -> None:
    if context.trace_request_ctx is not None:
        context.trace_request_ctx.connection = True


class Lines:
    """The lines of a reply being read, each with its `\\n` (the last one may lack it)."""

    def __init__(self, resp: aiohttp.ClientResponse, client: HTTPClient) -> None:
        self._resp = resp
        self._client = client

    def __aiter__(self) -> Lines:
        return self

    async def finish(self) -> None:
        """The caller has the last line it reads (`[DONE]`, Ollama's final line): wait a moment for
        the reply's framing to end (it is usually in flight), so the connection is kept for the next
        call rather than closed, which would make that call connect anew."""
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(END_GRACE_S):
                await self._resp.content.read()

    async def __anext__(self) -> bytes:
        try:
            line = await self._resp.content.readline()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._client._unreachable(e) from e
        except LineTooLong as e:
            raise BackendError(f"{self._client.server} sent a line longer than {MAX_LINE_BYTES} bytes") from e
        if not line:
            raise StopAsyncIteration
        return line


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
