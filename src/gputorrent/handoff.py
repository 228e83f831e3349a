"""Handing a worker's jobs to live workers that serve their models: for the reaper (the worker
died), and for a worker that drains or whose backend fails.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from gputorrent import queue, routing
from gputorrent.protocol import Job, WorkerState

log = logging.getLogger(__name__)


async def hand_on(
    redis: Redis,
    worker_id: str,
    source: str,
    workers: list[WorkerState],
    *,
    count_attempt: bool,
    max_attempts: int,
    ttl_s: int,
    only_if_dead: bool,
) -> int:
    """Move every job of the list `source` (of worker `worker_id`) to a live worker chosen round-robin,
    or, for a job that came from its model's shared queue, back to that queue. A pull job stays: it
    is its worker's alone, and waits for that worker to come back (until its deadline).

    `count_attempt` counts an attempt for each (past `max_attempts` it fails with `worker_lost`);
    with `only_if_dead` nothing moves once the worker's heartbeat is back, nor while `liveness:grace`
    holds (a coordinator saw Redis again just now). A job no live worker can take stays where it is.
    Returns how many jobs were moved or failed.
    """
    handled = 0
    for raw in await redis.lrange(source, 0, -1):
        job = _job_of(str(raw))
        shared = job is not None and job.shared
        movable = job is not None and not shared and job.kind != "pull"
        candidates = routing.candidates_for(job.model, workers) if job is not None and movable else []
        target = routing.pick_round_robin(candidates, await queue.next_round_robin(redis)) if candidates else None
        moved = await queue.retry_or_fail(
            redis, source, str(raw), started=count_attempt, target=target, max_attempts=max_attempts, ttl_s=ttl_s,
            dead=worker_id if only_if_dead else None,
        )  # fmt: skip
        if moved:
            to = "its model's shared queue" if shared else target or "nobody: it failed"
            log.info("a job of worker %s was handed to %s", worker_id, to)
            handled += 1
    return handled


def _job_of(raw: str) -> Job | None:
    """The job (None for an unreadable one: retry_or_fail drops it)."""
    try:
        return Job.model_validate_json(raw)
    except ValueError:
        return None
