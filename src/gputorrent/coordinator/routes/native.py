"""The seed's API: `/register`, `/workers`, `/inference`, `/result/{request_id}`, `/health`."""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from gputorrent import auth, catalogue, keys, queue, registry
from gputorrent.coordinator import overhead, quotas, relay, waiting
from gputorrent.coordinator.deps import (
    IDEMPOTENCY_HEADER,
    RedisDep,
    SettingsDep,
    SubmissionDep,
    WaiterDep,
    headers_schema,
)
from gputorrent.coordinator.dispatch import admit
from gputorrent.coordinator.encoding import SSE_MEDIA_TYPE, SSE_RESPONSES, STREAM_HEADERS, sse
from gputorrent.coordinator.security import Caller, ClientDep, JoinDep, owns, require_client
from gputorrent.coordinator.snapshot import current_pool, pool_snapshot
from gputorrent.errors import Conflict, GPUTorrentError, RequestNotFound, ServiceUnavailable
from gputorrent.protocol import (
    Accepted,
    ErrorInfo,
    InferenceRequest,
    JobResult,
    JobStatus,
    Registered,
    WorkerRecord,
    WorkerRegistration,
    WorkerState,
)
from gputorrent.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)
router = APIRouter()

HEALTH_PING_TIMEOUT_S = 2.0


@router.post(
    "/register", response_model=Registered, responses={409: {"description": "a live worker has this id"}},
    tags=["workers"],
)  # fmt: skip
async def register_worker(
    body: WorkerRegistration, redis: RedisDep, settings: SettingsDep, caller: JoinDep
) -> Registered:
    """A worker joins the pool with a join key, and gets a secret of its own.

    The id of a dead worker may be taken again; a live worker's id only with its secret (or an
    admin key), so nobody can take over a working worker's queue.
    """
    worker_id = body.worker_id or f"w-{uuid.uuid4().hex[:12]}"
    record = WorkerRecord(
        worker_id=worker_id,
        models=body.models,
        backend=body.backend,
        slots=body.slots,
        hardware=body.hardware,
        version=body.version,
        registered_at=time.time(),
        can_pull=body.can_pull,
        swarm=body.swarm,
        group=body.group,
    )
    try:  # before the worker is listed: a worker serves a model only with the file the catalogue has
        await catalogue.publish(redis, body.files)
    except catalogue.Conflict as e:
        raise Conflict(str(e), field=f"files.{e.model}.sha256") from None
    secret = auth.new_worker_secret()
    presented = auth.hash_secret(body.worker_secret) if body.worker_secret else ""
    stored = await registry.register(
        redis, record, settings.heartbeat_timeout_s, auth.hash_secret(secret), presented, force=caller.admin
    )
    if not stored:
        raise Conflict(
            f"a live worker is registered as {worker_id!r}; registering it again needs its worker_secret "
            "(a restarted worker gets its id back once the old heartbeat expires)"
        )
    pool_snapshot(redis).joined()
    if body.swarm is not None:
        await catalogue.joined(redis)
    log.info("worker %s registered backend=%s models=%s", worker_id, body.backend, ",".join(body.models))
    return Registered(
        worker_id=worker_id,
        worker_secret=secret,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
        registered_at=record.registered_at,
    )


MAX_WORKERS_PAGE = 10_000


@router.get("/workers", response_model=list[WorkerState], dependencies=[Depends(require_client)], tags=["workers"])
async def list_workers(
    redis: RedisDep,
    limit: Annotated[int | None, Query(ge=1, le=MAX_WORKERS_PAGE, description="at most this many workers")] = None,
    after: Annotated[str | None, Query(max_length=256, description="only the workers whose id sorts after it")] = None,
) -> list[WorkerState]:
    """Every registered worker, alive or not, with its load and queue length, sorted by id.

    A large pool is read a page at a time: `limit`, then `after` the last id of the page before.
    """
    workers = await current_pool(redis)
    start = 0 if after is None else bisect.bisect_right(workers, after, key=lambda w: w.worker_id)
    return await registry.with_telemetry(redis, workers[start : None if limit is None else start + limit])


@router.post(
    "/inference",
    status_code=202,
    response_model=Accepted,
    responses=SSE_RESPONSES,
    tags=["inference"],
    openapi_extra=headers_schema(IDEMPOTENCY_HEADER),
)
async def submit_inference(body: InferenceRequest, submission: SubmissionDep) -> Accepted | StreamingResponse:
    """Queue a request on a live worker that serves its model; answers with its `request_id`.

    With `"stream": true` the answer is a stream of server-sent events instead: `queued` (the
    202 body), `progress` each second it still waits in its queue (its place and an estimate of its
    start), one `token` event per batch of text, then `result` (what `/result` would return).
    """
    # Its priority and session are body fields here, so no placement headers.
    accepted = await admit(submission.redis, body, submission.settings, submission.caller, submission.idempotency_key())
    if not body.stream:
        return accepted
    return StreamingResponse(
        _events(accepted, submission.follow(accepted)), status_code=200, media_type=SSE_MEDIA_TYPE,
        headers=STREAM_HEADERS,
    )  # fmt: skip


async def _events(accepted: Accepted, following: AsyncIterator[relay.Relayed]) -> AsyncIterator[bytes]:
    yield sse(accepted.model_dump(), event="queued")
    async for event in _token_events(following):
        yield event


async def _token_events(following: AsyncIterator[relay.Relayed]) -> AsyncIterator[bytes]:
    """`token` events, then `result`, each with its stream entry id (a reconnecting client's `Last-Event-ID`)."""
    try:
        async for entry_id, item in following:
            if isinstance(item, JobResult):
                yield sse(item.model_dump(mode="json"), event="result", event_id=entry_id)
            elif isinstance(item, JobStatus):
                yield sse(item.model_dump(mode="json"), event="progress")
            else:
                yield sse({"text": item.text}, event="token", event_id=entry_id)
    except GPUTorrentError as e:  # the response has started: the error travels as the stream's last event
        yield sse(e.to_body(), event="error")


@router.get(
    "/stream/{request_id}",
    response_class=StreamingResponse,
    responses={
        200: {"description": "server-sent events: `token`..., then `result`", "content": {SSE_MEDIA_TYPE: {}}},
        404: {"description": "unknown request id"},
    },
    tags=["inference"],
)
async def follow_stream(
    request_id: str,
    request: Request,
    redis: RedisDep,
    waiter: WaiterDep,
    settings: SettingsDep,
    caller: ClientDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", pattern=r"^\d{1,20}-\d{1,20}$", description="continue after this event"),
    ] = None,
) -> StreamingResponse:
    """Follow a request from any coordinator: its tokens as they come (a streamed request), then its result.

    With `Last-Event-ID` (what a reconnecting EventSource sends) it continues after that event, so a
    client whose coordinator died resumes on another without a lost or repeated token. Leaving this
    stream does not cancel the request; `DELETE /inference/{request_id}` does.
    """
    found = await queue.lookup(redis, request_id) if await owns(redis, caller, request_id) else None
    if found is None:
        raise RequestNotFound(f"no request with id {request_id!r} (unknown, or its result expired)")
    # A follower costs a request and holds one of the key's stream slots (and a Redis connection) while open.
    slot = f"{request_id}:follower:{uuid.uuid4().hex[:12]}"
    await quotas.admit_follower(redis, caller, slot, settings)
    streamed = bool(await redis.exists(keys.stream_key(request_id))) or (isinstance(found, JobStatus) and found.stream)
    if streamed:
        following = relay.follow(
            redis, request_id, settings.max_sync_wait_s, settings.result_ttl_s, request.is_disconnected,
            owner=None, after=last_event_id or "0-0",
        )  # fmt: skip
        events = _token_events(following)
    else:
        events = _result_event(waiter, request_id, settings.max_sync_wait_s)
    return StreamingResponse(_releasing(events, redis, caller, slot), media_type=SSE_MEDIA_TYPE, headers=STREAM_HEADERS)


async def _releasing(events: AsyncIterator[bytes], redis: RedisDep, caller: Caller, slot: str) -> AsyncIterator[bytes]:
    """The events, then the follower's stream slot given back (however the stream ends)."""
    try:
        async for event in events:
            yield event
    finally:
        with anyio.CancelScope(shield=True):  # the server cancels this task when the client goes
            try:
                await quotas.close_stream(redis, caller, slot)
            except REDIS_FAILURES as e:  # the slot lapses on its own
                log.warning("could not give back stream slot %s (%s)", slot, e)


async def _result_event(waiter: WaiterDep, request_id: str, timeout_s: float) -> AsyncIterator[bytes]:
    """A request that is not streamed has one event: its result."""
    try:
        result = await relay.completed_result(waiter, request_id, timeout_s)
    except GPUTorrentError as e:
        yield sse(e.to_body(), event="error")
        return
    yield sse(result.model_dump(mode="json"), event="result")


CANCELLED_BY_CLIENT = ErrorInfo(code="cancelled", message="the request was cancelled by DELETE /inference/{id}")


@router.delete(
    "/inference/{request_id}",
    response_model=JobResult,
    responses={404: {"description": "unknown request id"}},
    tags=["inference"],
)
async def cancel_inference(request_id: str, redis: RedisDep, settings: SettingsDep, caller: ClientDep) -> JobResult:
    """Cancel a request: a queued job never runs, a running one stops at its next token.

    Answers with the job's result: the `cancelled` failure just written, or the result it
    already had (a finished job stays as it was).
    """
    if not await owns(redis, caller, request_id):  # another key's request is as good as unknown
        raise RequestNotFound(f"no request with id {request_id!r} (unknown, or its result expired)")
    ended = await queue.end(redis, request_id, CANCELLED_BY_CLIENT, settings.result_ttl_s)
    if ended is not None:
        return ended
    found = await queue.lookup(redis, request_id)
    if isinstance(found, JobResult):
        return found
    if isinstance(found, JobStatus):  # it moved between lists on every look: rare, and worth a retry
        raise ServiceUnavailable("the job is being handed between workers right now; retry the cancellation")
    raise RequestNotFound(f"no request with id {request_id!r} (unknown, or its result expired)")


@router.get(
    "/result/{request_id}",
    response_model=JobResult | JobStatus,
    responses={202: {"model": JobStatus}, 404: {"description": "unknown request id"}},
    tags=["inference"],
)
async def get_result(
    request_id: str,
    waiter: WaiterDep,
    redis: RedisDep,
    settings: SettingsDep,
    caller: ClientDep,
    response: Response,
    wait: Annotated[
        float, Query(ge=0, allow_inf_nan=False, description="seconds to hold the request until the result exists")
    ] = 0.0,
) -> JobResult | JobStatus:
    """The result when it exists (200), the job's status before that (202): while it is queued, with
    its `position` and an estimate of its start (`eta_s`)."""
    found = None  # another key's request is answered as unknown: a request id proves nothing alone
    if await owns(redis, caller, request_id):
        found = await waiter.wait(request_id, min(wait, settings.max_result_wait_s))
    if found is None:
        raise RequestNotFound(f"no request with id {request_id!r} (unknown, or its result expired)")
    if isinstance(found, JobStatus):
        response.status_code = 202
        return await waiting.place_in_queue(redis, found)
    return overhead.account(found)


@router.head("/", response_class=PlainTextResponse, include_in_schema=False)  # one schema entry: GET
@router.get(
    "/",
    response_class=PlainTextResponse,
    tags=["operations"],
    responses={307: {"description": "to the dashboard, for a browser (a request that accepts text/html)"}},
)
async def root(request: Request) -> Response:
    """A liveness answer at the root, as Ollama gives one (its CLI checks `HEAD /` before most commands);
    a browser is sent on to the dashboard."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/dashboard", status_code=307)
    return PlainTextResponse("GPU Torrent is running")


@router.get("/health", tags=["operations"])
async def health(redis: RedisDep) -> JSONResponse:
    """200 while Redis answers, 503 when it does not (for load balancers)."""
    try:
        await asyncio.wait_for(redis.ping(), HEALTH_PING_TIMEOUT_S)
    except REDIS_FAILURES:  # the wait's TimeoutError among them (an OSError)
        return JSONResponse(
            {"status": "unhealthy", "redis": "disconnected"}, status_code=503, headers={"Retry-After": "1"}
        )
    return JSONResponse({"status": "healthy", "redis": "connected"})
