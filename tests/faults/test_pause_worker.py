"""Scenario 3: SIGSTOP a worker past its heartbeat timeout, then SIGCONT.

Its jobs are handed on while it is paused; when it resumes it finishes the job it was running,
and that late result must be refused: one result per job, written by the other worker.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.harness import HEARTBEAT_TIMEOUT_S, RECOVERY_TARGET_S, Pool, Row

pytestmark = pytest.mark.fault

SCENARIO = "3. SIGSTOP a worker past its heartbeat timeout, then SIGCONT"
MAX_TOKENS = 16


def test_a_paused_worker_loses_its_jobs_and_its_late_result_is_discarded(
    pool: Pool, record: Callable[[Row], None]
) -> None:
    # w1 is fast (1.6 s a job), w2 slow (4.8 s): resumed at once, w1 writes its stale result
    # while w2 is still working, the order in which a missing lease check would store two results.
    pool.start_workers("w1", token_delay_s=0.1, slots=1)
    pool.start_workers("w2", token_delay_s=0.3, slots=8)
    prompt = "paused " + "word " * 20
    running, other = pool.submit(prompt, max_tokens=MAX_TOKENS), pool.submit("job 2", max_tokens=MAX_TOKENS)
    assert running and other
    behind = pool.submit(prompt + "behind", max_tokens=MAX_TOKENS)  # round-robin: the second job on w1
    assert behind and running.worker_id == behind.worker_id == "w1"

    wait_for(lambda: pool.status(running.request_id).get("status") == "running", 10, "w1 to start the job")
    paused_at = pool.pause("w1")
    pool.recovery.add([running.request_id, behind.request_id], since=paused_at)
    wait_for(lambda: not pool.is_alive("w1"), HEARTBEAT_TIMEOUT_S + 5, "w1's heartbeat to expire")
    pool.recovery.wait(15)  # both are running (or done) on w2 now
    assert pool.status(running.request_id).get("worker_id") == "w2"

    pool.resume("w1")
    wait_for(lambda: pool.is_alive("w1"), 10, "w1 to beat again after SIGCONT")
    # w1 finishes the job it was running when paused; its result must be refused, which the checks below see.
    discarded = f"request {running.request_id}: result discarded"
    stored = f"request {running.request_id} completed in"
    wait_for(lambda: discarded in pool.log_of("w1") or stored in pool.log_of("w1"), 15, "w1 to finish its old job")

    outcome = pool.settle()
    recover_s = pool.recovery.worst()
    record(outcome.row(SCENARIO, recover_s))

    outcome.assert_invariant()
    assert outcome.completed == 3
    assert outcome.results[running.request_id].worker_id == "w2"
    assert outcome.results[behind.request_id].worker_id == "w2"
    assert pool.announcements.counts()[running.request_id] == 1
    assert discarded in pool.log_of("w1")
    assert pool.workers["w1"].popen.poll() is None  # it went on, and is in the pool again
    assert recover_s is not None and recover_s <= RECOVERY_TARGET_S, f"recovered in {recover_s:.2f} s"

    # Back in the pool, w1 takes new work again.
    again = [pool.submit(f"after {i}", max_tokens=2) for i in range(2)]
    assert all(again)
    assert {job.worker_id for job in again if job} == {"w1", "w2"}
    pool.settle().assert_invariant()
