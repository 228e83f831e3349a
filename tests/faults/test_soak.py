"""Scenario 9: soak. N jobs across 3 workers while random workers are killed (-9) and restarted.

N is `GPUTORRENT_SOAK_JOBS` (150 by default, about 30 s on 2 cores; `bench/fault_report.py`
runs it with 1000), the chaos seed `GPUTORRENT_SOAK_SEED`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from tests.faults.conftest import PoolFactory
from tests.faults.harness import Chaos, Load, Row

SOAK_JOBS = int(os.environ.get("GPUTORRENT_SOAK_JOBS", "150"))
SOAK_SEED = int(os.environ.get("GPUTORRENT_SOAK_SEED", "20240"))
# Offered 10 jobs/s: below what two workers serve (8 tokens 10 ms apart), so while one is down no
# backlog builds and the time to recover measures the failover, not a queue.
RATE_PER_S = 10.0
WORKERS = ("w1", "w2", "w3")
SCENARIO = "9. soak: 3 workers, random kill -9 and restarts"

# The default 120 s per test is sized for the CI soak; a full-size one gets time in proportion.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(max(120, 60 + int(SOAK_JOBS / RATE_PER_S * 2)))]


def test_soak_with_random_kills_loses_and_duplicates_nothing(
    pool_factory: PoolFactory, record: Callable[[Row], None]
) -> None:
    pool = pool_factory()
    pool.coordinator("c1")
    pool.start_workers(*WORKERS, token_delay_s=0.01, slots=1)
    chaos = Chaos(pool, random.Random(SOAK_SEED), spacing=(15, 40))
    load = Load(pool, rate_per_s=RATE_PER_S, count=SOAK_JOBS, max_tokens=8, prompt=lambda n: f"soak {n} a b c d e f")
    load.start()
    try:
        chaos.run_until(
            lambda: (
                not load.is_alive() and pool.results_stored([j.request_id for j in pool.jobs()]) == len(pool.jobs())
            ),
            timeout_s=SOAK_JOBS / RATE_PER_S * 2 + 30,
        )
    finally:
        load.stop()
    outcome = pool.settle()
    record(outcome.row(SCENARIO, pool.recovery.worst()))

    outcome.assert_invariant(allowed_failures=["worker_lost"])  # a job can be unlucky MAX_ATTEMPTS times
    assert len(outcome.submitted) == SOAK_JOBS, f"refused: {load.refused}"  # the coordinator never went away
    assert len(chaos.kills) >= 3, f"only {len(chaos.kills)} kills: the soak tested little"
