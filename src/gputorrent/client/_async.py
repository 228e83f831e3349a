"""`AsyncAPIClient`: the asyncio client; the same methods as `APIClient`, awaited."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gputorrent.client import _base
from gputorrent.errors import ResultTimeout
from gputorrent.protocol import Accepted, ChatMessage, InferenceOptions, JobResult, JobStatus, WorkerState


class AsyncAPIClient:
    """Submit jobs to a coordinator and fetch their results.

    `api_key` is sent as `Authorization: Bearer`; without it the client uses `GPUTORRENT_API_KEY`.

    Example:
        >>> client = AsyncAPIClient("http://localhost:8000")  # doctest: +SKIP
        >>> (await client.infer("gemma3:270m", prompt="The capital of France is")).output  # doctest: +SKIP
    """

    def __init__(
        self,
        base_url: str = _base.DEFAULT_BASE_URL,
        *,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = _base.normalize_base_url(base_url)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout_s, transport=transport, headers=_base.auth_headers(api_key)
        )

    async def submit(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[ChatMessage] | list[dict[str, str]] | None = None,
        options: InferenceOptions | dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Accepted:
        """Queue a request; returns its `request_id` and the worker it went to.

        With your own `request_id`, submitting again (a retry after a lost answer) returns the
        same job instead of running it twice.
        """
        body = _base.inference_body(model, prompt, messages, options, request_id)
        return _base.parse_accepted(await self._request("POST", "/inference", json=body))

    async def result(self, request_id: str, *, wait_s: float = 0.0) -> JobResult | JobStatus:
        """The result (a `JobResult`, completed or failed) or, before it exists, the job's status."""
        return _base.parse_result(
            await self._request("GET", f"/result/{request_id}", params={"wait": wait_s}, timeout=wait_s + 30)
        )

    async def cancel(self, request_id: str) -> JobResult:
        """End a request (a queued job never runs; a running one stops at its next token).

        Returns its result: failed with code `cancelled`, or the result it already had.
        """
        response = await self._request("DELETE", f"/inference/{request_id}")
        _base.raise_for_error(response)
        return JobResult.model_validate_json(response.content)

    async def infer(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[ChatMessage] | list[dict[str, str]] | None = None,
        options: InferenceOptions | dict[str, Any] | None = None,
        timeout_s: float = 300.0,
    ) -> JobResult:
        """Submit and wait for the completed result.

        Raises:
            JobFailed: the job ended with status `failed` (its `code` says why).
            ResultTimeout: no result within `timeout_s`.
        """
        accepted = await self.submit(model, prompt, messages=messages, options=options)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (remaining_s := deadline - asyncio.get_running_loop().time()) > 0:
            found = await self.result(accepted.request_id, wait_s=min(remaining_s, _base.WAIT_SLICE_S))
            if isinstance(found, JobResult):
                return _base.completed_or_raise(found)
        raise ResultTimeout(f"no result for {accepted.request_id} within {timeout_s} s", request_id=accepted.request_id)

    async def workers(self) -> list[WorkerState]:
        """Every registered worker with its state."""
        return _base.parse_workers(await self._request("GET", "/workers"))

    async def health(self) -> dict[str, Any]:
        """The coordinator's `/health` body (raises `ServiceUnavailable` on 503)."""
        response = await self._request("GET", "/health")
        _base.raise_for_error(response)
        return response.json()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAPIClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise _base.connection_error(self.base_url, e) from None
