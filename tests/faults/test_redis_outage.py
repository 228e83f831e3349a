"""Scenario 4c: Redis is away longer than the heartbeat timeout while workers run long jobs.

Every heartbeat key lapses meanwhile, though no worker died: the workers only could not reach
Redis. When it is back, liveness must not be judged on what nobody could see: each worker gets a
full heartbeat timeout to beat again before any of its jobs move, so the jobs running at the
outage are finished by the worker that had them, their results are stored, and nothing runs twice.

Workers do not all reach Redis again at the same moment. Here `w1` reaches it as soon as it is
back, the others (through a proxy) `LATE_S` later, well within the heartbeat timeout: a reaper that
judged in between would hand their jobs to `w1`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import PoolFactory
from tests.faults.harness import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, Pool, RedisProxy, Row, WorkerSpec

pytestmark = pytest.mark.fault

SCENARIO = "4c. Redis away longer than the heartbeat timeout, long jobs running"
ON_TIME, LATE = "w1", ("w2", "w3")
WORKERS = (ON_TIME, *LATE)
OUTAGE_S = HEARTBEAT_TIMEOUT_S + 2.0  # every heartbeat key lapses meanwhile
LATE_S = 3 * HEARTBEAT_INTERVAL_S  # the late workers' way to Redis stays down this much longer
TOKEN_DELAY_S = 0.2
# Fake-backend jobs of one token per word: a short one ends while Redis is away (its result waits in
# its worker), a long one runs on well after Redis is back.
SHORT_WORDS, LONG_WORDS = 10, 50


def test_a_redis_outage_longer_than_the_heartbeat_timeout_takes_no_job_from_a_live_worker(
    pool_factory: PoolFactory, record: Callable[[Row], None]
) -> None:
    pool = pool_factory(appendonly=True)
    pool.coordinator("c1")
    proxy = RedisProxy(pool.redis.port)
    proxy.start()
    try:
        pool.start_workers(ON_TIME, token_delay_s=TOKEN_DELAY_S, slots=2)
        pool.start_workers(*LATE, token_delay_s=TOKEN_DELAY_S, slots=2, redis_url=proxy.url)
        # Round-robin routing: each worker gets one short and one long job.
        jobs = [
            pool.submit(" ".join(["w"] * words), max_tokens=words + 1)
            for words in [SHORT_WORDS] * len(WORKERS) + [LONG_WORDS] * len(WORKERS)
        ]
        assert all(job is not None for job in jobs)
        wait_for(lambda: sum(len(pool.held_by(w)) for w in WORKERS) == len(jobs), 15, "every job running")
        holder = {request_id: w for w in WORKERS for request_id in pool.held_by(w)}
        assert sorted(holder.values()) == sorted(WORKERS * 2)

        pool.redis.halt()  # SIGTERM: the server writes out its append-only file and exits
        halted_at = time.monotonic()
        proxy.refusing.set()
        wait_for(lambda: pool.health("c1") == 503, 15, "the coordinator to report Redis down")
        # Durations of the fault itself, not synchronisation: past OUTAGE_S every heartbeat key has
        # lapsed; the late workers' way back opens LATE_S after Redis is back.
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - halted_at)))
        pool.redis.start()
        back_at = time.time()
        time.sleep(LATE_S)
        proxy.refusing.clear()

        outcome = pool.settle()
        # Recovered when every result finished during the outage (the short jobs') is stored.
        stored_at = pool.announcements.first_at()
        held_through = [job.request_id for job in jobs[: len(WORKERS)] if job is not None]
        waited = [stored_at[rid] - back_at for rid in held_through if rid in stored_at]
        record(outcome.row(SCENARIO, max(waited) if len(waited) == len(held_through) else None))

        outcome.assert_invariant()
        logs = "".join(pool.log_of(w) for w in WORKERS)
        assert "heartbeat failed" in logs  # the workers' beats failed: their keys lapsed
        assert "result not stored yet" in logs  # a result finished during the outage waited in its worker
        assert logs.count("result discarded") == 0, "a live worker's finished work was thrown away"
        reruns = {rid: n for rid, n in pool.started_counts().items() if n != 1}
        assert not reruns, f"jobs started more than once: {reruns}"
        finished_by = {rid: outcome.results[rid].worker_id for rid in holder}
        assert finished_by == holder, "a job running at the outage was finished by another worker"
        assert all(pool.workers[w].popen.poll() is None for w in WORKERS)
        assert "sees Redis again after a break" in pool.coordinators["c1"][1].log  # it wrote the grace
    finally:
        for worker_id in LATE:
            pool.workers[worker_id].stop()  # before their way to Redis goes, so they stop as they normally would
        proxy.close()


def test_a_worker_started_while_redis_cannot_be_reached_waits_for_it_then_serves(pool: Pool) -> None:
    """Its start-up recovery (the jobs a previous run of its id left) meets no Redis: it tries again
    until Redis answers, as its consumers do, rather than exit (a worker restarted during a failover)."""
    proxy = RedisProxy(pool.redis.port)
    proxy.start()
    try:
        proxy.refusing.set()
        pool.specs["w1"] = WorkerSpec("w1", pool.url("c1"), 1, {}, proxy.url)
        worker = pool._launch("w1")
        wait_for(lambda: "cannot reach Redis to recover" in worker.log or worker.popen.poll() is not None, 30,
                 "the worker trying Redis again")  # fmt: skip
        assert worker.popen.poll() is None, worker.log
        proxy.refusing.clear()
        pool.wait_alive("w1")
        job = pool.submit("after the wait", max_tokens=4)
        assert job is not None
        outcome = pool.settle()
        outcome.assert_invariant()
        assert outcome.completed == 1
    finally:
        proxy.close()
