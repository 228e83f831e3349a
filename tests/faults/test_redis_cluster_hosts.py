"""Scenario L7: a Redis Cluster on hosts of its own; the host of the pool's cell's primary cut off
under load, and back.

Three primaries and a replica of each, one node a host (`cluster_host_pool` in
tests/faults/conftest.py); coordinator `c1`, workers `w16` and `w28` and the client each on a host of
its own, all given only the `redis+cluster://` URL with the primaries' addresses. A cut host drops
what it is sent, so unlike a killed node (scenario 11) nothing refuses a connection: every process
must give up on the cut node within its timeouts, ask the other nodes, and follow the promoted
replica. When the link comes back the old primary rejoins as a replica of the new one. Checked like
the rest of the suite (`Outcome.assert_invariant`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from redis.crc import key_slot

from gputorrent import keys
from tests.cluster import ClusterDeployment
from tests.conftest import wait_for
from tests.faults.harness import Row
from tests.faults.netns_pool import HostLoad, HostPool

pytestmark = pytest.mark.fault

# Both in cell 0 of the cluster's cells, as the pool's home keys are: every job of the load lies in
# that cell's slot, the one the fault hits.
WORKERS = ("w16", "w28")
assert all(keys.cell_of(worker_id, keys.CLUSTER_CELLS) == 0 for worker_id in WORKERS)
CELL = key_slot(keys.CLUSTER_CELL_TAG.encode())
REJOIN_TIMEOUT_S = 30.0


def test_the_pool_follows_the_cell_when_its_primarys_host_is_cut_off_and_the_old_primary_rejoins(
    cluster_host_pool: Callable[..., tuple[HostPool, ClusterDeployment]], record: Callable[[Row], None]
) -> None:
    scenario = "L7. Redis Cluster: the cell's primary's host link cut under load, a replica promoted, old one rejoins"
    pool, cluster = cluster_host_pool("c1", *WORKERS, "client")
    pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
    old = cluster.primary_of(CELL)
    assert old is not None and old.host is not None
    others = [node for node in cluster.nodes if node is not old]
    load = HostLoad(pool, "client", rate_per_s=20, max_tokens=6)
    load.start()
    try:
        wait_for(lambda: len(pool.announcements.counts()) >= 20, 30, "20 results before the cut")
        cut_at = time.time()
        old.host.cut()
        try:
            promoted = cluster.wait_for_new_primary(CELL, not_=old, among=others)
            promoted_at = time.time()
            wait_for(lambda: sum(j.at > promoted_at for j in pool.jobs()) >= 40, 60, "40 jobs after the promotion")
        finally:
            old.host.restore()
        wait_for(lambda: (role := old.ask("ROLE")) is not None and role[0] == "slave", REJOIN_TIMEOUT_S,
                 "the old primary a replica")  # fmt: skip
    finally:
        load.stop()
    outcome = pool.settle()
    first_by_worker = pool.first_results_after(outcome, cut_at)
    recover_s = max(first_by_worker.values()) - cut_at if len(first_by_worker) == len(WORKERS) else None
    record(outcome.row(scenario, recover_s))
    print(f"\ncluster host cut: replica promoted {promoted_at - cut_at:.2f} s after the cut; every worker storing "
          f"again {recover_s} s after it; refused {dict(load.refused)}")  # fmt: skip
    outcome.assert_invariant()
    assert set(first_by_worker) == set(WORKERS), f"workers storing results after the cut: {first_by_worker}"
    assert cluster.primary_of(CELL) is promoted
