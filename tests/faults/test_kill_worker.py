"""Scenario 1: kill -9 a worker mid-job; its jobs complete on another worker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.harness import HEARTBEAT_TIMEOUT_S, RECOVERY_TARGET_S, Pool, Row

pytestmark = pytest.mark.fault

SCENARIO = "1. kill -9 a worker mid-job"
TOKEN_DELAY_S = 0.1
MAX_TOKENS = 10  # a job takes about 1 s


def test_jobs_of_a_worker_killed_mid_job_complete_on_another(pool: Pool, record: Callable[[Row], None]) -> None:
    # w2 has spare slots, so a job handed to it starts at once: the time measured is the failover alone.
    pool.start_workers("w1", token_delay_s=TOKEN_DELAY_S, slots=1)
    pool.start_workers("w2", token_delay_s=TOKEN_DELAY_S, slots=8)
    jobs = [pool.submit(f"job {i} " + "word " * 20, max_tokens=MAX_TOKENS) for i in range(6)]
    assert all(jobs)
    on_w1 = [job.request_id for job in jobs if job and job.worker_id == "w1"]
    assert len(on_w1) == 3  # round-robin over two workers; w1 runs one, two wait in its queue

    wait_for(lambda: pool.status(on_w1[0]).get("status") == "running", 10, "w1 to start its first job")
    killed_at = pool.kill("w1")
    held = pool.held_by("w1")
    assert held == [on_w1[0]]  # the job it was running is still leased to it in Redis
    pool.recovery.add(held, since=killed_at)
    pool.recovery.wait(HEARTBEAT_TIMEOUT_S + 15)

    outcome = pool.settle()
    recover_s = pool.recovery.worst()
    record(outcome.row(SCENARIO, recover_s))

    outcome.assert_invariant()
    assert outcome.completed == 6
    # Everything w1 had (the started job and the two queued behind it) was done by w2.
    assert {outcome.results[rid].worker_id for rid in on_w1} == {"w2"}
    assert pool.started_counts()[on_w1[0]] == 2  # started on w1, then once more on w2
    assert recover_s is not None and recover_s <= RECOVERY_TARGET_S, f"recovered in {recover_s:.2f} s"
