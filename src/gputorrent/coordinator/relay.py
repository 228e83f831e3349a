"""Relaying a job's outcome to an HTTP client: wait for the result, or follow its token stream.

Shared by every API family; each turns these into its own wire format. No HTTP framework here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from gputorrent import streams
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.errors import JobFailed, ResultTimeout
from gputorrent.protocol import JobResult, TokenChunk

log = logging.getLogger(__name__)


async def completed_result(waiter: ResultWaiter, request_id: str, timeout_s: float) -> JobResult:
    """The job's result once it exists.

    Raises:
        ResultTimeout: no result within `timeout_s` (the job goes on; its id still answers on /result).
    """
    found = await waiter.wait(request_id, timeout_s)
    if not isinstance(found, JobResult):
        raise ResultTimeout(
            f"no result within {timeout_s:.0f} s; poll GET /result/{request_id} for it", request_id=request_id
        )
    return found


async def follow(redis: Redis, request_id: str, timeout_s: float, ttl_s: int) -> AsyncIterator[TokenChunk | JobResult]:
    """The job's tokens as they are generated, then its result.

    A client that goes away before the result (the consumer stops iterating) cancels the job:
    its worker stops at the next flush.
    """
    finished = False
    try:
        async for item in streams.follow(redis, request_id, timeout_s):
            if isinstance(item, JobResult):
                finished = True
            yield item
        if not finished:
            raise ResultTimeout(f"the stream of {request_id} produced no result within {timeout_s:.0f} s")
    finally:
        if not finished:
            log.info("request %s: client left the stream; cancelling", request_id)
            try:
                await streams.cancel(redis, request_id, ttl_s)
            except Exception as e:  # best effort on a connection that is going away
                log.warning("request %s: could not record the cancellation (%s)", request_id, e)


def failure(result: JobResult) -> JobFailed:
    """A failed result as the error an API that has no place for it reports."""
    error = result.error
    return JobFailed(
        error.message if error else "the job failed",
        request_id=result.request_id,
        code=error.code if error else "internal_error",
    )
