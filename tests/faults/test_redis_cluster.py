"""Scenarios 11 and 11b: the pool on a Redis Cluster, under load, while its cell's primary dies and
while its cell's slot moves to another primary.

The coordinator and the workers are given only the `redis+cluster://` URL (tests/cluster.py: three
primaries) and are not restarted. The pool lies in twelve cells, four on each primary; both workers
and every job of the load are in cell 0 (`keys.CLUSTER_CELL_TAG`), whose slot the fault hits. Each
process follows the slot to its new primary by itself. Every job that got a 202 ends with exactly one
result, with its own prompt's output, and nothing is left in a queue or a processing list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.crc import key_slot

from gputorrent import keys
from gputorrent.protocol import Heartbeat
from tests.cluster import ClusterDeployment
from tests.conftest import wait_for
from tests.faults.harness import HEARTBEAT_TIMEOUT_S, Load, Pool, Row

pytestmark = pytest.mark.fault

# Both in cell 0 of the cluster's cells, as the pool's home keys are: every job of the load lies in
# that cell's slot, the one the fault hits.
WORKERS = ("w16", "w28")
assert all(keys.cell_of(worker_id, keys.CLUSTER_CELLS) == 0 for worker_id in WORKERS)
CELL = key_slot(keys.CLUSTER_CELL_TAG.encode())
SCENARIO_FAILOVER = "11. Redis Cluster: kill -9 of the pool's cell's primary under load, a replica promoted"
SCENARIO_MIGRATION = "11b. Redis Cluster: the pool's cell's slot moved to another primary under load"
HALF_MOVED_KEYS = 20
HALF_MOVED_S = 2.0


def _load_through(pool: Pool, event: Callable[[], object], what: str) -> tuple[Load, float]:
    """Run a load of 20 jobs a second; once 20 have results, do `event`; stop once 40 more were accepted."""
    load = Load(pool, rate_per_s=20, max_tokens=6)
    load.start()
    try:
        wait_for(lambda: len(pool.announcements.counts()) >= 20, 30, f"20 results before {what}")
        at = time.time()
        event()
        wait_for(lambda: sum(j.at > at for j in pool.jobs()) >= 40, 60, f"40 jobs accepted after {what}")
    finally:
        load.stop()
    return load, at


def test_no_accepted_job_is_lost_when_the_cells_primary_is_killed_under_load(
    tmp_path: Path, record: Callable[[Row], None]
) -> None:
    with ClusterDeployment(tmp_path / "cluster", replicas=1) as cluster:
        pool = Pool(tmp_path, cluster)  # type: ignore[arg-type]  # only `.url` is read: the cluster URL
        try:
            pool.coordinator("c1")
            pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
            old = cluster.primary_of(CELL)
            assert old is not None

            def kill() -> None:
                old.kill()
                cluster.wait_for_new_primary(CELL, not_=old)

            load, killed_at = _load_through(pool, kill, "the kill")
            outcome = pool.settle()
            first_by_worker = pool.first_results_after(outcome, killed_at)
            recover_s = max(first_by_worker.values()) - killed_at if len(first_by_worker) == len(WORKERS) else None
            record(outcome.row(SCENARIO_FAILOVER, recover_s))
            print(f"\ncluster failover: every worker storing again {recover_s} s after the kill; "
                  f"refused {dict(load.refused)}")  # fmt: skip
            outcome.assert_invariant()
            assert set(first_by_worker) == set(WORKERS), f"workers storing results after the kill: {first_by_worker}"
            assert all(pool.workers[w].popen.poll() is None for w in WORKERS)  # nobody restarted or died
        finally:
            pool.close()


def test_no_job_is_lost_or_run_twice_when_the_cells_slot_moves_under_load(
    tmp_path: Path, record: Callable[[Row], None]
) -> None:
    """The slot moves by the steps Redis documents (`tests/cluster.py`), held half done for
    `HALF_MOVED_S`: meanwhile the old primary runs commands on the keys it still has and answers
    `ASK` or `TRYAGAIN` for the others; the scripts on a request's path wait, other commands fail as
    on a lost connection (a 503), and nothing runs twice. Afterwards every process uses the new
    primary: the workers keep beating there for longer than a heartbeat timeout."""
    with ClusterDeployment(tmp_path / "cluster") as cluster:
        pool = Pool(tmp_path, cluster)  # type: ignore[arg-type]
        try:
            pool.coordinator("c1")
            pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
            old = cluster.primary_of(CELL)
            new = next(node for node in cluster.primaries() if node is not old)
            moved: list[int] = []

            def move() -> None:
                source = cluster.begin_migration(CELL, to=new)
                moved.append(cluster.move_keys(CELL, source, new, at_most=HALF_MOVED_KEYS))
                time.sleep(HALF_MOVED_S)  # the fault's length, not a wait for anything
                moved.append(cluster.finish_migration(CELL, source, new))

            load, moved_at = _load_through(pool, move, "the move")
            outcome = pool.settle()
            record(outcome.row(SCENARIO_MIGRATION, None))
            print(f"\ncluster slot move: {moved} keys moved (half, then the rest); refused {dict(load.refused)}")
            outcome.assert_invariant()
            assert moved[0] == HALF_MOVED_KEYS and moved[1] > 0, f"the cell had too few keys to move: {moved}"
            # Only the cell's: other cells on that primary hold keys too (an API key's counters lie in its id's cell).
            assert old is not None and old.client.execute_command("CLUSTER", "COUNTKEYSINSLOT", CELL) == 0, (
                "keys of the moved cell left on the old primary"
            )

            def beating_since_the_move(worker_id: str) -> bool:
                beat = pool.client.get(keys.heartbeat_key(worker_id))
                return beat is not None and Heartbeat.model_validate_json(beat).at > moved_at + HEARTBEAT_TIMEOUT_S

            for worker_id in WORKERS:
                wait_for(lambda w=worker_id: beating_since_the_move(w), 3 * HEARTBEAT_TIMEOUT_S, f"{worker_id} beating")
            assert new.client.exists(*(f"{{c0}}heartbeat:{w}" for w in WORKERS)) == len(WORKERS)
        finally:
            pool.close()
