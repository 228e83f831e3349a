"""The pool at a glance, as the dashboard and `gputorrent status` show it: one read of Redis, no HTTP here."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from gputorrent import catalogue, pool_stats, registry
from gputorrent.coordinator.snapshot import current_pool
from gputorrent.pool_stats import HistoryPoint
from gputorrent.protocol import SwarmTransfer, WorkerState
from gputorrent.redis_client import RedisClient
from gputorrent.telemetry import FailureRecord

RATE_WINDOW_S = 60  # the "now" figures are averages over the last minute
# Worker rows `/pool` carries at most: past that (a pool of thousands, pushed to every dashboard each
# interval) the ones needing attention first, then the busiest; `totals` still counts every worker.
MAX_WORKER_ROWS = 500


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class ModelQueue(_View):
    """One model: the workers serving it and the jobs waiting or running on them."""

    model: str
    workers: int
    live_workers: int  # alive: taking jobs
    queued: int
    in_flight: int


class Totals(_View):
    workers: dict[str, int]  # by state
    slots: int  # of the workers not dead
    slots_busy: int
    queued: int
    in_flight: int


class Rates(_View):
    """The last minute's averages (finished jobs, generated tokens)."""

    window_s: int
    jobs_per_s: float
    failed_per_s: float
    tokens_per_s: float
    ttft_avg_s: float | None
    latency_avg_s: float | None


class PoolOverview(_View):
    at: float
    workers: list[WorkerState]  # every worker by id, or past `MAX_WORKER_ROWS` those `worker_rows` picks
    models: list[ModelQueue]
    totals: Totals
    rates: Rates
    bucket_s: int
    history: list[HistoryPoint]  # oldest first, one point per `bucket_s`
    failures: list[FailureRecord] | None  # newest first; None when the caller may not see them
    transfers: list[SwarmTransfer] = Field(default_factory=list)  # model files being fetched from the swarm now


async def overview(redis: RedisClient, history_s: int, *, with_failures: bool) -> PoolOverview:
    """Read the pool, its history over the last `history_s` seconds and (if asked) its recent failures."""
    now = time.time()
    workers = await current_pool(redis)
    history = await pool_stats.history(redis, max(history_s, RATE_WINDOW_S), now)
    failures = await pool_stats.recent_failures(redis) if with_failures else None
    transfers = await catalogue.transfers(redis)
    points_kept = history_s // pool_stats.BUCKET_S
    return PoolOverview(
        at=now,
        workers=await registry.with_telemetry(redis, worker_rows(workers)),
        models=model_queues(workers),
        totals=totals(workers),
        rates=rates(history[-(RATE_WINDOW_S // pool_stats.BUCKET_S) :]),
        bucket_s=pool_stats.BUCKET_S,
        history=history[-points_kept:],
        failures=failures,
        transfers=transfers,
    )


def worker_rows(workers: list[WorkerState]) -> list[WorkerState]:
    """Every worker, by id; past `MAX_WORKER_ROWS`, that many: those not alive first, then the busiest."""
    if len(workers) <= MAX_WORKER_ROWS:
        return workers
    return sorted(workers, key=lambda w: (w.state == "alive", -(w.jobs_in_flight + w.queue_length), w.worker_id))[
        :MAX_WORKER_ROWS
    ]


def model_queues(workers: list[WorkerState]) -> list[ModelQueue]:
    """Per model, from the workers that list it (a worker serving two models counts for both)."""
    serving: dict[str, list[WorkerState]] = {}
    for w in workers:
        for model in w.models:
            serving.setdefault(model, []).append(w)
    return [
        ModelQueue(
            model=model,
            workers=len(listed),
            live_workers=sum(1 for w in listed if w.state == "alive"),
            queued=sum(w.queue_length for w in listed),
            in_flight=sum(w.jobs_in_flight for w in listed),
        )
        for model, listed in sorted(serving.items())
    ]


def totals(workers: list[WorkerState]) -> Totals:
    states = {state: 0 for state in ("alive", "draining", "unhealthy", "dead")}
    for w in workers:
        states[w.state] += 1
    running = [w for w in workers if w.state != "dead"]
    return Totals(
        workers=states,
        slots=sum(w.slots for w in running),
        slots_busy=sum(w.jobs_in_flight for w in running),
        queued=sum(w.queue_length for w in workers),
        in_flight=sum(w.jobs_in_flight for w in running),
    )


def rates(points: list[HistoryPoint]) -> Rates:
    """Averages over `points`; the latencies are weighted by the jobs of each point."""
    n = len(points) or 1
    jobs = sum(p.jobs_per_s for p in points)

    def weighted(values: list[tuple[float | None, float]]) -> float | None:
        weight = sum(w for v, w in values if v is not None)
        return sum(v * w for v, w in values if v is not None) / weight if weight else None

    return Rates(
        window_s=len(points) * pool_stats.BUCKET_S,
        jobs_per_s=jobs / n,
        failed_per_s=sum(p.failed_per_s for p in points) / n,
        tokens_per_s=sum(p.tokens_per_s for p in points) / n,
        ttft_avg_s=weighted([(p.ttft_avg_s, p.jobs_per_s) for p in points]),
        latency_avg_s=weighted([(p.latency_avg_s, p.jobs_per_s) for p in points]),
    )
