"""Seeing the pool: the dashboard and playground pages, `/pool` (JSON and live events) and `/metrics`.

The pages are static files shipped in the package; they hold no data and need no key. What they
show comes from `/pool`, `/pool/events`, `/v1/models` and `/inference`, which take a client key
like any API route. The recent failures (their messages may quote a request) are shown to admin
keys only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, ProcessCollector
from starlette.middleware import Middleware

from gputorrent import pool_stats, registry
from gputorrent.coordinator import metrics, pool_view
from gputorrent.coordinator.deps import RedisDep
from gputorrent.coordinator.encoding import SSE_MEDIA_TYPE, STREAM_HEADERS, sse
from gputorrent.coordinator.routes import add_routes
from gputorrent.coordinator.security import ClientDep, require_client
from gputorrent.coordinator.snapshot import current_pool
from gputorrent.errors import RedisUnavailable
from gputorrent.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)
router = APIRouter(tags=["observability"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DEFAULT_HISTORY_S = 600
# The pages load only their own files: an injected script or a third-party asset would not run.
PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}

HistoryQuery = Annotated[
    int,
    Query(
        ge=2 * pool_stats.BUCKET_S, le=pool_stats.HISTORY_S,
        description=f"seconds of history, {2 * pool_stats.BUCKET_S} to {pool_stats.HISTORY_S}",
    ),
]  # fmt: skip


def install(app: FastAPI) -> None:
    """Add the pages, the routes and the request metrics to the app (the metrics middleware goes
    outermost, so a request refused by any other middleware is counted too)."""
    registry_ = CollectorRegistry()
    ProcessCollector(registry=registry_)
    GCCollector(registry=registry_)
    registry_.register(metrics.ReplicationCollector())
    app.state.metrics_registry = registry_
    app.state.pool_totals = metrics.PoolTotals()
    app.state.metrics_rendering = asyncio.Lock()  # one scrape's text at a time: they cannot pile up
    add_routes(app, router)
    app.mount("/dashboard/assets", StaticFiles(directory=STATIC_DIR), name="dashboard-assets")
    app.add_middleware(metrics.RequestMetrics, registry=registry_)
    app.user_middleware.append(Middleware(metrics.RouteNote))  # appended: the innermost of all


@router.get("/dashboard", response_class=FileResponse, include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", headers=PAGE_HEADERS)


@router.get("/dashboard/playground", response_class=FileResponse, include_in_schema=False)
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.html", headers=PAGE_HEADERS)


@router.get("/pool", response_model=pool_view.PoolOverview)
async def pool(
    redis: RedisDep, caller: ClientDep, history_s: HistoryQuery = DEFAULT_HISTORY_S
) -> pool_view.PoolOverview:
    """Workers with their telemetry, queues per model, the last minute's rates, the history and
    (admin keys only) the recent failures."""
    return await pool_view.overview(redis, history_s, with_failures=caller.admin)


@router.get(
    "/pool/events",
    response_class=StreamingResponse,
    responses={200: {"description": "server-sent events: `pool` (what GET /pool answers), again every interval"}},
)
async def pool_events(
    request: Request,
    redis: RedisDep,
    caller: ClientDep,
    history_s: HistoryQuery = DEFAULT_HISTORY_S,
    interval_s: Annotated[float, Query(ge=0.5, le=60, allow_inf_nan=False, description="seconds between events")] = 2.0,
) -> StreamingResponse:
    """The pool overview as a server-sent event at once and then every `interval_s`, until the client leaves.

    While Redis is unreachable an `error` event replaces the `pool` event, and the stream goes on.
    """

    async def events() -> AsyncIterator[bytes]:
        while not await request.is_disconnected():
            try:
                found = await pool_view.overview(redis, history_s, with_failures=caller.admin)
                yield sse(found.model_dump(mode="json"), event="pool")
            except REDIS_FAILURES as e:
                log.warning("pool events: Redis unavailable (%s)", e)
                yield sse(RedisUnavailable("the coordinator cannot read Redis right now").to_body(), event="error")
            await asyncio.sleep(interval_s)

    return StreamingResponse(events(), media_type=SSE_MEDIA_TYPE, headers=STREAM_HEADERS)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_client)],
    responses={200: {"description": "Prometheus text exposition", "content": {CONTENT_TYPE_LATEST: {}}}},
)
async def prometheus_metrics(
    request: Request,
    redis: RedisDep,
    per_worker: Annotated[
        bool,
        Query(description="with the series of every worker (false: the pool's totals and per-model series only, "
                          "which do not grow with the pool)"),
    ] = True,
) -> Response:  # fmt: skip
    """This coordinator's request counters, then the pool read from Redis now: its totals, job counters
    and latency histograms by model, and (unless `per_worker=false`) slots, queues, GPU and CPU
    telemetry, job counters and latency histograms per worker."""
    workers = await registry.with_telemetry(redis, await current_pool(redis))
    # Off the event loop: at 10,000 workers the per-worker text takes seconds to write.
    async with request.app.state.metrics_rendering:
        body = await asyncio.to_thread(
            metrics.exposition, request.app.state.metrics_registry, workers, request.app.state.pool_totals,
            per_worker=per_worker,
        )  # fmt: skip
    return Response(body, media_type=CONTENT_TYPE_LATEST)
