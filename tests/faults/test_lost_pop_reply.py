"""Scenario 4b: the connection between a worker and Redis drops just after Redis ran the worker's
take (the script that moves a job into its processing list), so the reply that carries the job
never reaches the worker.

Redis has moved the job into `processing:{worker}`; the worker reconnects without knowing it holds
it, and its heartbeat keeps it alive, so no reaper touches it. The worker finds such entries
itself (held by none of its consumers on two looks) and queues them again. A Redis restart under
load can cause this too (the server exits before writing the replies of its last commands).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import PoolFactory
from tests.faults.harness import HEARTBEAT_TIMEOUT_S, RedisProxy, Row

pytestmark = pytest.mark.fault

SCENARIO = "4b. worker's Redis connection cut after a pop, reply lost"


def test_a_job_whose_pop_reply_was_lost_still_completes(
    pool_factory: PoolFactory, record: Callable[[Row], None]
) -> None:
    pool = pool_factory()
    pool.coordinator("c1")
    proxy = RedisProxy(pool.redis.port)
    proxy.start()
    try:
        pool.start_workers("w1", redis_url=proxy.url)
        # The reply that carries the job to w1 (the first reply holding a request id) never arrives.
        proxy.withhold_from = b'"request_id"'
        job = pool.submit("lost reply", max_tokens=3)  # the coordinator talks to Redis directly: 202
        assert job is not None and job.worker_id == "w1"
        wait_for(lambda: pool.held_by("w1") == [job.request_id], 10, "Redis to move the job to w1")
        cut_at = time.time()
        proxy.cut()  # the reply carrying the job is gone with the connection
        pool.recovery.add([job.request_id], since=cut_at)
        outcome = pool.settle(timeout_s=3 * HEARTBEAT_TIMEOUT_S)
        recover_s = pool.recovery.worst()
        record(outcome.row(SCENARIO, recover_s))
        assert pool.workers["w1"].popen.poll() is None  # w1 lives on, reconnected
        outcome.assert_invariant()
        assert outcome.results[job.request_id].worker_id == "w1"  # taken back by w1 itself: it never died
    finally:
        pool.workers["w1"].stop()  # before its way to Redis goes, so it stops as it normally would
        proxy.close()
