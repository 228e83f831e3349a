"""Scenario 4: Redis restarts under load (append-only file, fsync every second, stopped with SIGTERM).

The coordinator and the workers are not restarted: they must reconnect by themselves, and no
job that got a 202 may be lost, whether it was queued, running or finished at the restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import PoolFactory
from tests.faults.harness import Load, Row

pytestmark = pytest.mark.fault

SCENARIO = "4. Redis restart (append-only, SIGTERM) under load"
WORKERS = ("w1", "w2")
OUTAGE_NOTICED = ("cannot reach Redis", "result not stored yet")


def test_no_accepted_job_is_lost_when_redis_restarts_under_load(
    pool_factory: PoolFactory, record: Callable[[Row], None]
) -> None:
    pool = pool_factory(appendonly=True)
    pool.coordinator("c1")
    pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
    load = Load(pool, rate_per_s=25, max_tokens=6)
    load.start()
    try:
        # Under way: jobs queued, running and finished when Redis goes.
        wait_for(lambda: len(pool.announcements.counts()) >= 30, 30, "30 results before the restart")
        noticed_before = {w: _outage_lines(pool.log_of(w)) for w in WORKERS}
        accepted_before = len(pool.jobs())
        pool.redis.halt()  # SIGTERM: the server writes out its append-only file and exits
        # Keep it down until every process has seen the outage, so each must reconnect by itself.
        wait_for(lambda: pool.health("c1") == 503, 15, "the coordinator to report Redis down")
        wait_for(
            lambda: all(_outage_lines(pool.log_of(w)) > noticed_before[w] for w in WORKERS),
            15,
            "every worker to notice the outage",
        )
        pool.redis.start()
        back_at = time.time()
        wait_for(lambda: pool.health("c1") == 200, 15, "the coordinator to reach Redis again")
        wait_for(lambda: len(pool.jobs()) >= accepted_before + 60, 30, "60 more jobs accepted after the restart")
    finally:
        load.stop()

    outcome = pool.settle()
    after = [job for job in pool.jobs() if job.at > back_at]
    by_worker: dict[str, float] = {}  # each worker's first result after the restart
    announced_at = pool.announcements.first_at()
    for job in after:
        result = outcome.results.get(job.request_id)
        if result is not None and job.request_id in announced_at:
            at = announced_at[job.request_id] - back_at
            by_worker[result.worker_id] = min(at, by_worker.get(result.worker_id, at))
    # Recovered when every worker stores results again: the slowest worker's first one after the restart.
    recover_s = max(by_worker.values()) if len(by_worker) == len(WORKERS) else None
    record(outcome.row(SCENARIO, recover_s))

    outcome.assert_invariant()
    assert load.refused["c1"] > 0  # the outage was real: submissions were refused while Redis was down
    assert all(pool.workers[w].popen.poll() is None for w in WORKERS)  # nobody restarted or died
    assert set(by_worker) == set(WORKERS), f"workers that stored results after the restart: {by_worker}"


def _outage_lines(log: str) -> int:
    return sum(log.count(line) for line in OUTAGE_NOTICED)
