"""The JSON-over-HTTP call both HTTP backends make, with every failure turned into a `BackendError`."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gputorrent.errors import BackendError, BackendUnavailable

# Connecting is bounded tightly; a reply may take minutes on a big model, but a server that
# accepts and then goes silent must not hold a slot forever.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


async def request_json(
    session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None, server: str
) -> dict[str, Any]:
    """Send `body` as JSON and return the JSON object answered.

    Raises:
        BackendUnavailable: unreachable, or a 5xx status (with the server's own message).
        BackendError: a 4xx status, or a reply that is not JSON.
    """
    try:
        async with session.request(method, url, json=body) as resp:
            text = await resp.text()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as e:
        raise BackendUnavailable(f"cannot reach {server}: {e or type(e).__name__}") from e
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if status >= 400:
        failure = BackendUnavailable if status >= 500 else BackendError  # 5xx: another worker may do
        raise failure(f"{server} answered {status}: {error_text(payload) if payload is not None else text[:200]}")
    if not isinstance(payload, dict):
        raise BackendError(f"{server} answered something that is not a JSON object: {text[:200]!r}")
    return payload


def error_text(payload: Any) -> str:
    """The message inside Ollama's `{"error": "..."}` or OpenAI's `{"error": {"message": ...}}`."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(payload)
