"""Every body the coordinator takes is JSON: read it as JSON whatever content type `curl -d` claims.

Ollama's own documentation posts with `curl -d '{...}'` and no header, which curl labels as a
form; Ollama reads it as JSON regardless, and so do we, for every route.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_READ_AS_JSON = {b"", b"application/x-www-form-urlencoded", b"text/plain"}


class JsonBodies:
    """Relabel a missing, form or plain-text content type as `application/json`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if declared in _READ_AS_JSON:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
