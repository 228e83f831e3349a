"""Scenario 5: kill -9 one of two coordinators (one Redis) under load.

The jobs it accepted live in Redis, not in it: they still complete, their results are read
through the survivor, and none is dispatched twice.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import PoolFactory
from tests.faults.harness import Load, Row

pytestmark = pytest.mark.fault

SCENARIO = "5. kill -9 one of two coordinators under load"


def test_jobs_accepted_by_a_killed_coordinator_complete_through_the_other(
    pool_factory: PoolFactory, record: Callable[[Row], None]
) -> None:
    pool = pool_factory()
    doomed, survivor = pool.coordinator("c1"), pool.coordinator("c2")
    # One worker registered through each coordinator: the one registered with c1 must not care that it died.
    pool.start_workers("w1", token_delay_s=0.05, slots=2, coordinator="c1")
    pool.start_workers("w2", token_delay_s=0.05, slots=2, coordinator="c2")
    # About 0.3 s a job, 4 slots: ~13 jobs/s served against 20/s offered, so a backlog builds up.
    load = Load(pool, rate_per_s=20, coordinators=["c1", "c2"], max_tokens=6)
    load.start()
    try:
        wait_for(lambda: len(load.accepted_by(doomed)) >= 40, 30, "40 jobs accepted by c1")
        killed_at = pool.kill_coordinator("c1")
        load.use(["c2"])
        pending = [job.request_id for job in load.accepted_by(doomed)]
        unfinished = len(pending) - pool.results_stored(pending)
        wait_for(lambda: len(load.accepted_by(survivor)) >= 60, 30, "60 jobs accepted by c2")
    finally:
        load.stop()

    outcome = pool.settle(via="c2")
    # Nothing had to be handed on; what is measured is how soon a job c1 had accepted and not finished
    # completed after c1 died.
    announced_at = pool.announcements.first_at()
    after_kill = [announced_at[rid] - killed_at for rid in pending if announced_at.get(rid, 0) > killed_at]
    recover_s = min(after_kill, default=None)
    record(outcome.row(SCENARIO, recover_s))

    outcome.assert_invariant()
    assert unfinished > 0, "c1 died with nothing pending: the scenario tested nothing"
    assert all(rid in outcome.results for rid in pending)  # read through c2
    started = pool.started_counts()
    assert {rid: n for rid, n in started.items() if n != 1} == {}, "jobs started more than once"
    assert set(started) >= {job.request_id for job in outcome.submitted}
    assert pool.workers["w1"].popen.poll() is None  # the worker registered through c1 went on
