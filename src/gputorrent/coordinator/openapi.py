"""The coordinator's OpenAPI schema, with the error answers every route can give in its family's shape.

FastAPI documents only the 422 of validation; our routes also answer 401/403 (keys), 404, 409,
413, 429, 503 (Redis, no workers) and, where they wait for a result, 502/504, each API family in
its own error shape, and the OpenAI, Ollama and Anthropic routes report invalid requests as 400.
The schema says so, so clients and fuzzers can hold the coordinator to it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

NATIVE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
ERROR_STATUSES = {
    "400": "invalid request",
    "401": "no API key, or not a live one",
    "403": "the key's scope does not allow this",
    "404": "not found",
    "409": "conflict",
    "413": "body too large",
    "422": "invalid request: `error.fields` names each bad field",
    "429": "a per-key limit is reached (`Retry-After`)",
    "502": "the job failed on its worker",
    "503": "Redis unavailable or no live worker serves the model (`Retry-After`)",
    "504": "no result in time",
}
OPEN_PATHS = {"/", "/health", "/openapi.json"}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` return the schema with every route's error answers."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in document.get("paths", {}).items():
                for operation in operations.values():
                    _add_errors(path, operation)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _add_errors(path: str, operation: dict[str, Any]) -> None:
    body, native = _error_schema(path)
    responses = operation.setdefault("responses", {})
    for status, description in ERROR_STATUSES.items():
        if path in OPEN_PATHS and status in ("401", "403", "429"):
            continue
        if status == "422" and not native:
            responses.pop(status, None)  # these families answer 400 instead
            continue
        if status == "400" and native:
            continue
        responses[status] = {"description": description, "content": {"application/json": {"schema": body}}}


def _error_schema(path: str) -> tuple[dict[str, Any], bool]:
    """The error body of the family `path` belongs to, and whether that is the native family."""
    if path.startswith("/v1/messages"):
        return ANTHROPIC_ERROR, False
    if path.startswith("/v1/"):
        return OPENAI_ERROR, False
    if path.startswith("/api/"):
        return OLLAMA_ERROR, False
    return NATIVE_ERROR, True
