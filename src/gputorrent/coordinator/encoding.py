"""Framing for streamed responses: server-sent events and NDJSON, in one place."""

from __future__ import annotations

import json
from typing import Any

SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
SSE_DONE = b"data: [DONE]\n\n"
# Proxies (nginx) buffer responses unless told not to; a buffered stream is no stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The OpenAPI `responses` of a route that may stream, so the schema names the streamed media type.
SSE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "with `stream: true`: server-sent events", "content": {SSE_MEDIA_TYPE: {}}}
}
NDJSON_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "streamed unless `stream` is false: NDJSON", "content": {NDJSON_MEDIA_TYPE: {}}}
}


def sse(data: Any, event: str | None = None, event_id: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = (f"id: {event_id}\n" if event_id else "") + (f"event: {event}\n" if event else "")
    return f"{head}data: {payload}\n\n".encode()


def ndjson(data: Any) -> bytes:
    """One line of newline-delimited JSON."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
