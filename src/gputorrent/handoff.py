"""Handing a worker's jobs to live workers that serve their models: for the reaper (the worker
died), and for a worker that drains or whose backend fails.
"""

from __future__ import annotations

import logging

from gputorrent import queue, routing
from gputorrent.protocol import WorkerState
from gputorrent.redis_client import RedisClient

log = logging.getLogger(__name__)


async def hand_on(
    redis: RedisClient,
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
    dead = worker_id if only_if_dead else None
    entries = await queue.read_held(redis, source)
    for job in await queue.held_jobs(redis, source, entries, worker_id, ttl_s, reader="a hand-on", dead=dead):
        candidates: list[str] = []
        if not job.shared and job.kind != "pull":
            job, candidates = routing.hand_on_candidates(job, workers)
        shared = job.shared
        target = routing.pick_round_robin(candidates, await queue.next_round_robin(redis)) if candidates else None
        moved = await queue.retry_or_fail(
            redis, source, job, started=count_attempt, target=target, max_attempts=max_attempts, ttl_s=ttl_s, dead=dead
        )
        if moved:
            to = "its model's shared queue" if shared else target or "nobody: it failed"
            log.info("a job of worker %s was handed to %s", worker_id, to)
            handled += 1
    return handled
