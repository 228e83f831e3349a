"""Relaying a job's outcome to an HTTP client: wait for the result, or follow its token stream.

Shared by every API family; each turns these into its own wire format. No HTTP framework here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from gputorrent import queue, streams
from gputorrent.coordinator import overhead, quotas, waiting
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.coordinator.security import Caller
from gputorrent.errors import JobFailed, RedisUnavailable, ResultTimeout
from gputorrent.protocol import Accepted, ErrorInfo, JobResult, JobStatus, TokenChunk
from gputorrent.redis_client import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)

Relayed = tuple[str, TokenChunk | JobResult | JobStatus]
"""What `follow` gives: a stream entry (its id and its text or the result), or the job's place in its
queue while it waits (id "")."""

DISCONNECT_CHECK_S = 1.0  # how often a follower asks whether its client is still there

CLIENT_LEFT = ErrorInfo(
    code="cancelled", message="the client left before the result (its stream closed); the job was ended"
)


async def completed_result(
    waiter: ResultWaiter, request_id: str, timeout_s: float, *, admitted: bool = False
) -> JobResult:
    """The job's result once it exists (`admitted`: see `ResultWaiter.wait`).

    Raises:
        ResultTimeout: no result within `timeout_s` (the job goes on; its id still answers on /result).
    """
    found = await waiter.wait(request_id, timeout_s, admitted=admitted)
    if not isinstance(found, JobResult):
        raise ResultTimeout(
            f"no result within {timeout_s:g} s; poll GET /result/{request_id} for it", request_id=request_id
        )
    return overhead.account(found)


async def succeeded(waiter: ResultWaiter, accepted: Accepted, timeout_s: float) -> JobResult:
    """The result of a job this request admitted (or replayed), for an API that answers once it is
    done and has no place for a failed result: a failure raises its error (`failure`)."""
    result = await completed_result(waiter, accepted.request_id, timeout_s, admitted=not accepted.replayed)
    if result.status == "failed":
        raise failure(result)
    return result


async def follow(
    redis: RedisClient,
    request_id: str,
    timeout_s: float,
    ttl_s: int,
    disconnected: Callable[[], Awaitable[bool]],
    *,
    owner: Caller | None,
    after: str = "0-0",
) -> AsyncIterator[Relayed]:
    """The job's tokens as they are generated (after the entry id `after`), then its result, each
    with its stream entry id. While the job waits in a queue, its place (a `JobStatus` with
    `position` and `eta_s`, entry id "") after each second without a token.

    Raises:
        ResultTimeout: no result within `timeout_s`.
        RedisUnavailable: Redis failed on the way.

    When the `owner` (the caller that submitted the job; None for another follower) goes away
    before the result (`disconnected()` turns true, checked at least once a second, or the
    consumer stops iterating), the job is ended as cancelled: a queued job never runs, a running
    one stops at its next token. The owner's stream slot is given back either way.
    """
    finished, queued = False, True
    client_left = _ClientLeft(disconnected)
    try:
        async for batch in streams.follow(redis, request_id, timeout_s, after):
            # Only a round that brought nothing looks up the queue: the first token's path stays as short.
            if queued and not batch and (place := await _place_in_queue(redis, request_id)) is not None:
                yield "", place
            else:
                queued = False
            for entry_id, item in batch:
                if isinstance(item, JobResult):
                    finished, item = True, overhead.account(item)
                yield entry_id, item
            if not finished and await client_left.after(batch):
                return
        if not finished:
            raise ResultTimeout(f"the stream of {request_id} produced no result within {timeout_s:g} s")
    except REDIS_FAILURES as e:  # one error type for every route to put in its stream
        log.warning("request %s: Redis failed mid-stream (%s)", request_id, e)
        raise RedisUnavailable("the coordinator lost Redis while streaming; retry shortly") from e
    finally:
        if owner is not None:
            with anyio.CancelScope(shield=True):  # shielded: see below
                try:
                    await quotas.close_stream(redis, owner, request_id)
                except REDIS_FAILURES as e:  # the slot lapses on its own
                    log.warning("request %s: could not give back its stream slot (%s)", request_id, e)
        if not finished and owner is not None:
            log.info(
                "request %s: the stream ended without a result (client left, timeout or Redis); cancelling", request_id
            )
            # Shielded: the server cancels this task when the client goes, and that cancellation
            # (anyio's, level-triggered) would otherwise abort the write at its first await.
            with anyio.CancelScope(shield=True):
                try:
                    await queue.end(redis, request_id, CLIENT_LEFT, ttl_s)
                except REDIS_FAILURES as e:
                    log.warning("request %s: could not record the cancellation (%s)", request_id, e)


class _ClientLeft:
    """Asks `disconnected()` after a round that brought nothing, else at most once a second: asking the
    server after every batch of text took a sixth of the coordinator's busy time per relayed token (B6)."""

    def __init__(self, disconnected: Callable[[], Awaitable[bool]]) -> None:
        self._disconnected = disconnected
        self._asked_at = asyncio.get_running_loop().time()

    async def after(self, batch: list[streams.StreamEntry]) -> bool:
        now = asyncio.get_running_loop().time()
        if batch and now - self._asked_at < DISCONNECT_CHECK_S:
            return False
        self._asked_at = now
        return await self._disconnected()


async def _place_in_queue(redis: RedisClient, request_id: str) -> JobStatus | None:
    """The job's status with its place in its queue while it is queued; None once it is not."""
    found = await queue.lookup(redis, request_id)
    if not isinstance(found, JobStatus) or found.status != "queued":
        return None
    placed = await waiting.place_in_queue(redis, found)
    return placed if placed.position is not None else None  # taken just now


def failure(result: JobResult) -> JobFailed:
    """A failed result as the error an API that has no place for it reports."""
    error = result.error
    return JobFailed(
        error.message if error else "the job failed",
        request_id=result.request_id,
        code=error.code if error else "internal_error",
    )
