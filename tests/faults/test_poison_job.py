"""Scenario 8: a poison job that kills its worker every time, with workers restarted as they die.

It must end failed with `worker_lost` after GPUTORRENT_MAX_ATTEMPTS crashes, not loop through
restarts forever, and the jobs around it must complete.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gputorrent.worker.backends.fake import CRASH_TRIGGER
from tests.conftest import wait_for
from tests.faults.conftest import PoolFactory
from tests.faults.harness import Row, Supervisor

pytestmark = pytest.mark.fault

SCENARIO = "8. poison job (kills its worker every time), workers restarted"
MAX_ATTEMPTS = 2


def test_a_job_that_kills_every_worker_ends_worker_lost_and_the_rest_complete(
    pool_factory: PoolFactory, record: Callable[[Row], None]
) -> None:
    pool = pool_factory(max_attempts=MAX_ATTEMPTS)
    pool.coordinator("c1")
    pool.start_workers("w1", "w2", token_delay_s=0.02, slots=1)
    supervisor = Supervisor(pool)
    supervisor.start()
    try:
        before = [pool.submit(f"before {i} a b c", max_tokens=5) for i in range(10)]
        poison = pool.submit(f"poison {CRASH_TRIGGER}")
        after = [pool.submit(f"after {i} a b c", max_tokens=5) for i in range(10)]
        assert poison and all(before) and all(after)
        wait_for(lambda: len(supervisor.exits) >= 1, 30, "the poison job to crash its first worker")
        first_crash_at = supervisor.first_exit_at
        # The jobs queued behind the poison on the crashed worker are the ones the crash held up.
        behind = [job.request_id for job in after if job and job.worker_id == poison.worker_id]
        pool.recovery.add(behind, since=first_crash_at)
        wait_for(lambda: pool.results_stored([poison.request_id]) == 1, 60, "the poison job's verdict")
        outcome = pool.settle()
        # The exit of the last crash may still be on its way to the supervisor: count once idle.
        wait_for(lambda: all(p.popen.poll() is None for p in pool.workers.values()), 30, "the restarts")
    finally:
        supervisor.stop()
    recover_s = pool.recovery.worst()
    record(outcome.row(SCENARIO, recover_s))

    outcome.assert_invariant(allowed_failures=["worker_lost"])
    verdict = outcome.results[poison.request_id]
    assert verdict.status == "failed" and verdict.error is not None and verdict.error.code == "worker_lost"
    assert outcome.failed == {"worker_lost": 1}
    assert outcome.completed == 20
    assert [code for _, code in supervisor.exits] == [1] * MAX_ATTEMPTS  # one crash per attempt, no more
