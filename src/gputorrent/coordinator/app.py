"""The coordinator's FastAPI app, built from settings by `create_app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gputorrent import __version__, auth, keys, queue, redis_client, replication
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator import openapi
from gputorrent.coordinator.error_shapes import error_body
from gputorrent.coordinator.json_bodies import JsonBodies
from gputorrent.coordinator.limits import BodySizeLimit
from gputorrent.coordinator.listener import Listener
from gputorrent.coordinator.overhead import OverheadHeader
from gputorrent.coordinator.reaper import Reaper
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.coordinator.routes import (
    add_routes,
    admin,
    anthropic,
    native,
    observability,
    ollama,
    openai,
    shards,
    swarm,
    worker,
)  # fmt: skip
from gputorrent.coordinator.snapshot import pool_snapshot
from gputorrent.errors import GPUTorrentError, RateLimited, RedisUnavailable, Unauthorized
from gputorrent.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)

LISTENER_STOP_TIMEOUT_S = 5.0
REDIS_MAX_CONNECTIONS = 2048
REDIS_CONNECT_TIMEOUT_S = 2.0
# Every command the coordinator sends is answered at once, but for its blocking reads (a stream
# follower's XREAD, a linked worker's long-poll take), which add their own wait to this: so a Redis
# that went silent (a cut link) turns a request into a 503 within about this, not a hang.
REDIS_REPLY_TIMEOUT_S = 2.0


def create_app(settings: CoordinatorSettings) -> FastAPI:
    """The coordinator: every route, the error mapping and the background result listener."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A bounded, blocking pool: past its size (every open stream holds a connection) requests wait a
        # little for a free one instead of failing at once. A Sentinel URL gives the same bound; on a
        # cluster it bounds each node's connections, and a request past it fails at once (a 503).
        redis = redis_client.async_client(
            settings.redis_url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_REPLY_TIMEOUT_S,
            max_connections=REDIS_MAX_CONNECTIONS,
            pool_timeout=5,
        )  # closing the client closes the pool
        replication.configure(redis, settings.wait_replicas, settings.wait_timeout_ms)
        waiter = ResultWaiter(redis)
        key_cache = auth.KeyCache()
        snapshot = pool_snapshot(redis)

        def result_announced(message: str) -> None:
            request_id, result_json = queue.read_announcement(message)
            waiter.announced(request_id, result_json)
            snapshot.announced(request_id)

        announced = {channel: result_announced for channel in keys.results_channels()}
        sharded = keys.sharded_channels()  # on a cluster: a shard channel a cell, read on each primary
        listener = Listener(
            redis,
            {keys.KEYS_REVOKED_CHANNEL: key_cache.revoked, **({} if sharded else announced)},
            subscribers=(key_cache,) if sharded else (waiter, key_cache),
            shard_handlers=announced if sharded else None,
            shard_subscribers=(waiter,),
        )
        reaper = Reaper(
            redis, settings.heartbeat_interval_s, settings.max_attempts, settings.result_ttl_s,
            heartbeat_timeout_s=settings.heartbeat_timeout_s, dead_worker_retention_s=settings.dead_worker_retention_s,
        )  # fmt: skip
        app.state.redis, app.state.settings, app.state.waiter = redis, settings, waiter
        app.state.key_cache = key_cache

        async def primary_switched(address: str) -> None:
            log.warning("the Sentinels failed the Redis primary over to %s; reconnecting", address)
            await redis_client.reconnect(redis)
            listener.reconnect()

        stop_following = asyncio.Event()
        background = [
            asyncio.create_task(listener.run(), name="listener"),
            asyncio.create_task(reaper.run(), name="reaper"),
            asyncio.create_task(
                redis_client.follow_failovers(redis, primary_switched, stop_following), name="failovers"
            ),
        ]
        try:
            yield
        finally:
            listener.stop()  # each ends its current step and returns: nothing is cut off half-way
            reaper.stop()
            stop_following.set()
            await snapshot.close()
            _, pending = await asyncio.wait(background, timeout=LISTENER_STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await redis.aclose()

    app = FastAPI(title="GPU Torrent coordinator", version=__version__, lifespan=lifespan)
    for router in (
        native.router,
        openai.router,
        ollama.router,
        anthropic.router,
        admin.router,
        worker.router,
        swarm.router,
        shards.router,
    ):
        add_routes(app, router)
    openapi.install(app)
    app.add_middleware(JsonBodies)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(OverheadHeader)
    observability.install(app)  # last: its request metrics wrap every other middleware
    app.add_exception_handler(GPUTorrentError, _domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    for failure in REDIS_FAILURES:
        if failure is not OSError:  # any other OSError is the coordinator's own (a 500)
            app.add_exception_handler(failure, _redis_down)
    return app


def _error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    status, body = error_body(request.url.path, status, code, message, details)
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


async def _domain_error(request: Request, exc: GPUTorrentError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return _error_response(request, exc.http_status, exc.code, exc.message, exc.details, headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Framework errors (unknown route, wrong method) in the same shape as ours."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(request, exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    """Any Redis failure (unreachable, timed out, out of memory under noeviction) is a 503, never a 500."""
    log.warning("Redis unavailable: %s", exc)
    details = None
    if isinstance(exc, replication.Unreplicated):  # done on the primary, not yet safe: a repeat confirms it
        error = RedisUnavailable(
            f"no Redis replica confirmed request {exc.request_id} in time (a failover may be under way); "
            "retry shortly with the same request_id or Idempotency-Key, which never makes a second job"
        )
        details = {"request_id": exc.request_id}
    else:
        error = RedisUnavailable("the coordinator cannot use Redis right now; retry shortly")
    return _error_response(request, error.http_status, error.code, error.message, details, headers={"Retry-After": "1"})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with `{"error": {"code", "message", "fields"}}`; `message` names each bad field."""
    fields: list[dict[str, Any]] = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            fields.append({"field": "body", "message": "the body is not valid JSON"})
            continue
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path", "header")]
        fields.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid")})
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    details = {"fields": fields, "param": fields[0]["field"] if fields else None}
    return _error_response(request, 422, "invalid_request", message, details)
