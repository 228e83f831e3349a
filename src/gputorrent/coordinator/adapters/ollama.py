"""Ollama's wire format: tolerant request models and pure functions to and from ours."""

from __future__ import annotations

from typing import Any


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    """Ollama's error shape: `{"error": "message"}`."""
    return {"error": message}
