"""What the sync and async clients share: request bodies, response parsing, error mapping.

>>> normalize_base_url("localhost:8000/")
'http://localhost:8000'
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from pydantic import ValidationError

from gputorrent.errors import (
    ERRORS_BY_CODE,
    GPUTorrentError,
    InvalidRequest,
    JobFailed,
    NotFound,
    ServiceUnavailable,
)
from gputorrent.protocol import (
    Accepted,
    ChatMessage,
    InferenceOptions,
    InferenceRequest,
    JobResult,
    JobStatus,
    WorkerState,
)

DEFAULT_BASE_URL = "http://localhost:8000"
API_KEY_VARIABLE = "GPUTORRENT_API_KEY"  # where the clients and the CLI find a key when none is passed
WAIT_SLICE_S = 30.0  # longest single `?wait=` the client asks for; it re-asks until its own deadline


def auth_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer` with `api_key`, else with `GPUTORRENT_API_KEY`, else nothing."""
    key = api_key or os.environ.get(API_KEY_VARIABLE)
    return {"Authorization": f"Bearer {key}"} if key else {}


def normalize_base_url(url: str) -> str:
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


def inference_body(
    model: str,
    prompt: str | None,
    messages: list[ChatMessage] | list[dict[str, str]] | None,
    options: InferenceOptions | dict[str, Any] | None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Validate locally (a bad argument fails before any network call) and return the JSON body."""
    try:
        request = InferenceRequest.model_validate(
            {"model": model, "prompt": prompt, "messages": messages, "options": options or {}, "request_id": request_id}
        )
    except ValidationError as e:  # the same error class the coordinator's 422 maps to
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}" for err in e.errors())
        raise InvalidRequest(problems) from None
    return request.model_dump(mode="json", exclude_none=True)


def raise_for_error(response: httpx.Response) -> None:
    """Turn an error response into the matching `GPUTorrentError` subclass."""
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
    except (ValueError, KeyError, TypeError):
        code, message, details = "", response.text or response.reason_phrase, {}
    cls = ERRORS_BY_CODE.get(code) or _class_for_status(response.status_code)
    raise cls(message, **details)


def _class_for_status(status: int) -> type[GPUTorrentError]:
    if status == 404:
        return NotFound
    if status == 503:
        return ServiceUnavailable
    return GPUTorrentError


def parse_accepted(response: httpx.Response) -> Accepted:
    raise_for_error(response)
    return Accepted.model_validate_json(response.content)


def parse_result(response: httpx.Response) -> JobResult | JobStatus:
    raise_for_error(response)
    if response.status_code == 202:
        return JobStatus.model_validate_json(response.content)
    return JobResult.model_validate_json(response.content)


def parse_workers(response: httpx.Response) -> list[WorkerState]:
    raise_for_error(response)
    return [WorkerState.model_validate(w) for w in response.json()]


def completed_or_raise(result: JobResult) -> JobResult:
    """The result if it completed; a `JobFailed` carrying the job's error code otherwise."""
    if result.status == "failed":
        error = result.error
        raise JobFailed(
            error.message if error else "the job failed",
            request_id=result.request_id,
            code=error.code if error else "internal_error",
        )
    return result


def connection_error(base_url: str, exc: httpx.TransportError) -> ServiceUnavailable:
    return ServiceUnavailable(f"cannot reach the coordinator at {base_url}: {exc}")
