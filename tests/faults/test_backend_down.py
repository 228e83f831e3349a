"""Scenario 7: one worker's backend goes down (the worker lives on): its jobs fail over to another
worker, it reports itself unhealthy and gets no new job, and it serves again once the backend is back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.faults.harness import RECOVERY_TARGET_S, Pool, Row

pytestmark = pytest.mark.fault

SCENARIO = "7. backend down on one worker"
HEALTH = {"GPUTORRENT_HEALTH_INTERVAL_S": "0.5", "GPUTORRENT_HEALTH_TIMEOUT_S": "2"}


def test_jobs_fail_over_from_a_worker_whose_backend_is_down(
    pool: Pool, record: Callable[[Row], None], tmp_path: Path
) -> None:
    down = tmp_path / "w1-backend-down"
    pool.start_workers("w1", env={**HEALTH, "GPUTORRENT_FAKE_DOWN_FILE": str(down)})
    pool.start_workers("w2", env=HEALTH)
    down.touch()
    downed_at = time.time()
    first = [pool.submit(f"job {i}", max_tokens=4) for i in range(6)]
    assert all(first)
    first_ids = [job.request_id for job in first if job]
    pool.recovery.add(first_ids, since=downed_at)  # however they were routed, all must run soon

    wait_for(lambda: _state(pool, "w1") == "unhealthy", 10, "w1 to report itself unhealthy")
    later = [pool.submit(f"later {i}", max_tokens=4) for i in range(4)]
    assert all(later)
    wait_for(lambda: pool.results_stored([j.request_id for j in first + later if j]) == 10, 20, "every result")

    down.unlink()  # the backend is back: the next probe finds it generating
    wait_for(lambda: _state(pool, "w1") == "alive", 10, "w1 to be healthy again")
    back = [pool.submit(f"back {i}", max_tokens=4) for i in range(6)]
    assert all(back)

    outcome = pool.settle()
    recover_s = pool.recovery.worst()
    record(outcome.row(SCENARIO, recover_s))
    outcome.assert_invariant()
    # While its backend was down w1 completed nothing; once it was back, it served again.
    assert {outcome.results[rid].worker_id for rid in first_ids + [j.request_id for j in later if j]} == {"w2"}
    assert "w1" in {outcome.results[j.request_id].worker_id for j in back if j}
    assert "is unhealthy" in pool.log_of("w1")
    assert recover_s is not None and recover_s <= RECOVERY_TARGET_S, f"recovered in {recover_s:.2f} s"


def _state(pool: Pool, worker_id: str) -> str | None:
    for worker in httpx.get(f"{pool.url()}/workers", timeout=5).json():
        if worker["worker_id"] == worker_id:
            return str(worker["state"])
    return None
