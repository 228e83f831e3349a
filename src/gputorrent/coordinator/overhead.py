"""What the pool adds to a request besides inference: the `x-gputorrent-overhead-ms` header and
`timings.overhead_ms`.

Overhead is the time spent admitting, queued, dispatching and relaying, as opposed to running the
model. For the request that submitted a job (a completion answered when done), it is that request's
whole time in this coordinator less the job's `inference_ms`: both measured on one machine's clock
each, so clocks that differ between machines do not enter it. A result read by another request
(`GET /result`, a follower's `GET /stream`) gives the sum of the parts the job recorded
(`admission_ms + queued_ms + dispatch_ms`). A response with no result (a 202, a list, an error)
is all overhead: the header is this coordinator's time on it. A stream's header goes out as the
stream starts, so it holds the admission; the stream's final result carries the whole figure.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gputorrent.protocol import JobResult

HEADER = "x-gputorrent-overhead-ms"


class _Note:
    """A request's arrival, the job it admitted, and the overhead its answer reports once known."""

    __slots__ = ("admitted", "arrived", "overhead_ms")

    def __init__(self) -> None:
        self.arrived = time.perf_counter()
        self.admitted = ""
        self.overhead_ms: float | None = None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.arrived) * 1000


# Holds a mutable note, not values: a stream's body runs in a task of its own, on a copy of the context.
_note: ContextVar[_Note | None] = ContextVar("gputorrent_request_overhead", default=None)


def admission_ms() -> float:
    """How long the current request has been in this coordinator (0 outside a request)."""
    note = _note.get()
    return round(note.elapsed_ms(), 3) if note is not None else 0.0


def note_admitted(request_id: str) -> None:
    """The current request admitted this job: its result's overhead is this request's time less inference."""
    note = _note.get()
    if note is not None:
        note.admitted = request_id


def account(result: JobResult) -> JobResult:
    """`result` with its `timings.overhead_ms`, which the current response's header reports too."""
    timings = result.timings
    note = _note.get()
    if note is not None and note.admitted == result.request_id:
        overhead_ms = max(0.0, note.elapsed_ms() - timings.inference_ms)
    else:
        overhead_ms = timings.admission_ms + timings.queued_ms + timings.dispatch_ms
    overhead_ms = round(overhead_ms, 3)
    if note is not None:
        note.overhead_ms = overhead_ms
    return result.model_copy(update={"timings": timings.model_copy(update={"overhead_ms": overhead_ms})})


class OverheadHeader:
    """ASGI middleware: starts each request's note and puts `x-gputorrent-overhead-ms` on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = _Note()
        token = _note.set(note)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                overhead_ms = note.overhead_ms if note.overhead_ms is not None else note.elapsed_ms()
                headers = [*message.get("headers", []), (HEADER.encode(), f"{overhead_ms:.3f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _note.reset(token)
