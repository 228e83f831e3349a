"""The pool's recent history in Redis: per-bucket job figures and the last failures, shared by every coordinator.

Workers add what they finished to the bucket of the current `BUCKET_S` seconds (one pipeline per
heartbeat interval, not per job); a coordinator adds the failures it writes itself (deadlines),
and each result it stores for a worker linked through it (`/worker` routes).
Buckets expire after `HISTORY_S`, so the history costs a few hundred small hashes at most.

>>> bucket_of(1003.9)
1000
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from pydantic import BaseModel, ConfigDict

from gputorrent import keys
from gputorrent.protocol import Job, JobResult
from gputorrent.redis_client import RedisClient
from gputorrent.telemetry import FailureRecord

BUCKET_S = 5
HISTORY_S = 15 * 60  # how far back the history goes
FAILURES_KEPT = 50
FAILURE_MESSAGE_CHARS = 500  # a backend's message can be long; the dashboard needs its start


def bucket_of(at: float) -> int:
    """The start (unix seconds) of the bucket holding the moment `at`."""
    return int(at // BUCKET_S * BUCKET_S)


@dataclass
class StatsDelta:
    """Job figures not yet added to Redis."""

    jobs: int = 0  # finished: completed or failed
    failed: int = 0
    tokens: int = 0  # generated
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    latency_sum_s: float = 0.0
    queue_wait_sum_s: float = 0.0
    failures: list[FailureRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.jobs > 0

    def add(self, later: StatsDelta) -> None:
        """Fold in `later`, the figures of jobs that finished after these; failures stay oldest first."""
        for f in fields(self):
            if f.name != "failures":
                setattr(self, f.name, getattr(self, f.name) + getattr(later, f.name))
        self.failures = [*self.failures, *later.failures][-FAILURES_KEPT:]

    def commands(self, at: float) -> list[tuple[str | int | float, ...]]:
        """The Redis commands that add this delta to the bucket of `at` and push its failures."""
        key = keys.stats_key(bucket_of(at))
        commands: list[tuple[str | int | float, ...]] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "failures" or not value:
                continue
            commands.append(("HINCRBYFLOAT" if isinstance(value, float) else "HINCRBY", key, f.name, value))
        commands.append(("EXPIRE", key, HISTORY_S + 2 * BUCKET_S))
        if self.failures:
            commands.append(("LPUSH", keys.recent_failures(), *(r.model_dump_json() for r in self.failures)))
            commands.append(("LTRIM", keys.recent_failures(), 0, FAILURES_KEPT - 1))
        return commands


def job_delta(job: Job, result: JobResult, worker_id: str, finished_at: float) -> StatsDelta:
    """The figures one finished job adds to the pool's history: none for a pull, which is no inference
    (and whose minutes of download would swamp the latency figures)."""
    if job.kind == "pull":
        return StatsDelta()
    queue_wait_s = result.timings.queued_ms / 1000
    first_token_ms = result.timings.first_token_ms
    ttft_s = (result.timings.queued_ms + first_token_ms) / 1000 if first_token_ms is not None else None
    failed = result.status == "failed"
    failures = []
    if failed:
        error = result.error
        failures.append(FailureRecord(
            at=finished_at, request_id=job.request_id, model=job.model, worker_id=worker_id,
            code=error.code if error else "failed", message=(error.message if error else "")[:FAILURE_MESSAGE_CHARS],
        ))  # fmt: skip
    return StatsDelta(
        jobs=1, failed=int(failed), tokens=result.usage.completion_tokens,
        ttft_sum_s=ttft_s or 0.0, ttft_count=int(ttft_s is not None),
        latency_sum_s=max(0.0, finished_at - job.enqueued_at), queue_wait_sum_s=queue_wait_s, failures=failures,
    )  # fmt: skip


async def add(redis: RedisClient, delta: StatsDelta, at: float | None = None) -> None:
    """Add the delta to Redis in one round trip."""
    if not delta:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for command in delta.commands(time.time() if at is None else at):
            pipe.execute_command(*command)
        await pipe.execute()


async def record_failure(redis: RedisClient, failure: FailureRecord) -> None:
    """Count one failed job that no worker reports (a coordinator ended it)."""
    await add(redis, StatsDelta(jobs=1, failed=1, failures=[failure]), failure.at)


class HistoryPoint(BaseModel):
    """One bucket of the history: what finished in `[at, at + BUCKET_S)`."""

    model_config = ConfigDict(frozen=True)

    at: int
    jobs_per_s: float
    failed_per_s: float
    tokens_per_s: float
    ttft_avg_s: float | None  # admission to first token, over the jobs that produced one
    latency_avg_s: float | None  # admission to result
    queue_wait_avg_s: float | None


async def history(redis: RedisClient, span_s: int, now: float | None = None) -> list[HistoryPoint]:
    """Every bucket of the last `span_s` seconds, oldest first, empty ones included; the bucket in
    progress is left out (its figures are still arriving)."""
    last = bucket_of(time.time() if now is None else now) - BUCKET_S
    starts = list(range(last - (span_s // BUCKET_S - 1) * BUCKET_S, last + 1, BUCKET_S))
    async with redis.pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(keys.stats_key(start))
        buckets = await pipe.execute()
    return [
        _point(start, {str(k): float(v) for k, v in raw.items()}) for start, raw in zip(starts, buckets, strict=True)
    ]


def _point(at: int, raw: dict[str, float]) -> HistoryPoint:
    jobs, ttft_count = raw.get("jobs", 0.0), raw.get("ttft_count", 0.0)
    return HistoryPoint(
        at=at,
        jobs_per_s=jobs / BUCKET_S,
        failed_per_s=raw.get("failed", 0.0) / BUCKET_S,
        tokens_per_s=raw.get("tokens", 0.0) / BUCKET_S,
        ttft_avg_s=raw.get("ttft_sum_s", 0.0) / ttft_count if ttft_count else None,
        latency_avg_s=raw.get("latency_sum_s", 0.0) / jobs if jobs else None,
        queue_wait_avg_s=raw.get("queue_wait_sum_s", 0.0) / jobs if jobs else None,
    )


async def recent_failures(redis: RedisClient, limit: int = FAILURES_KEPT) -> list[FailureRecord]:
    """The last failures, newest first; an unreadable entry is skipped."""
    found = []
    for raw in await redis.lrange(keys.recent_failures(), 0, limit - 1):
        try:
            found.append(FailureRecord.model_validate_json(raw))
        except ValueError:
            continue
    return found
