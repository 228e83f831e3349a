"""The wire shape of an error, chosen by the API family a path belongs to. No HTTP framework here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gputorrent.coordinator.adapters import anthropic, ollama, openai

ErrorBody = Callable[[int, str, str | None, str | None], dict[str, Any]]


def _family(path: str) -> ErrorBody | None:
    if path.startswith("/v1/messages"):
        return anthropic.error_body
    if path.startswith("/v1/"):
        return openai.error_body
    if path.startswith("/api/"):
        return ollama.error_body
    return None


def error_body(
    path: str, status: int, code: str, message: str, details: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, body) for an error on `path`: each API family's own shape, ours on the native routes."""
    details = details or {}
    family = _family(path)
    if family is not None:
        status = 400 if status == 422 else status  # the other APIs report every invalid request as 400
        return status, family(status, message, code, details.get("param"))
    # `param` is OpenAI's name for the field at fault; our own shape lists `fields` instead.
    extra = {k: v for k, v in details.items() if k != "param"}
    return status, {"error": {"code": code, "message": message, **extra}}
