"""Scenario 6: SIGTERM a busy worker: it takes no new job, hands its queue on at once, finishes the
job it runs, and leaves the pool."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.harness import Pool, Row

pytestmark = pytest.mark.fault

SCENARIO = "6. SIGTERM drain of a busy worker"
TOKEN_DELAY_S = 0.1
MAX_TOKENS = 20  # a job takes about 2 s


def test_a_draining_worker_finishes_its_job_hands_its_queue_on_and_leaves(
    pool: Pool, record: Callable[[Row], None]
) -> None:
    pool.start_workers("w1", token_delay_s=TOKEN_DELAY_S)
    jobs = [pool.submit(f"job {i} " + "word " * 30, max_tokens=MAX_TOKENS) for i in range(4)]
    assert all(jobs)  # w1 is the only worker: it runs the first, the rest wait (in its queue or its model's)
    ids = [job.request_id for job in jobs if job]
    pool.start_workers("w2", token_delay_s=TOKEN_DELAY_S, slots=4)
    wait_for(lambda: pool.status(ids[0]).get("status") == "running", 10, "w1 to start its first job")

    sent_at = time.time()
    pool.workers["w1"].signal(signal.SIGTERM)
    pool.recovery.add(ids[1:], since=sent_at)  # the queued ones: how soon they run elsewhere
    assert pool.workers["w1"].popen.wait(timeout=30) == 0, pool.log_of("w1")

    outcome = pool.settle()
    recover_s = pool.recovery.worst()
    record(outcome.row(SCENARIO, recover_s))
    outcome.assert_invariant()
    assert outcome.results[ids[0]].worker_id == "w1"  # finished within its grace period, not handed on
    assert {outcome.results[rid].worker_id for rid in ids[1:]} == {"w2"}
    assert pool.started_counts()[ids[0]] == 1  # nothing ran twice
    assert "w1 left the pool" in pool.log_of("w1")
    assert not pool.client.exists("worker:w1")
    assert recover_s is not None and recover_s <= 2.0, f"the queue waited {recover_s:.2f} s"
