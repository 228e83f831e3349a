"""The pool in three cells on a real three-primary Redis Cluster (tests/cluster.py), one cell on each
primary (`keys.cluster_tags`): the tests of test_cells.py run again here, on the cluster, so every
script, pipeline, transaction and read of many keys runs where the cluster itself refuses any that
spans two slots, and a process reaches the cells of every primary through one client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from gputorrent import keys
from gputorrent.redis_client import RedisClient
from tests.cluster import ClusterDeployment
from tests.integration import test_cells as cells


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    return cluster_url


@pytest.fixture(autouse=True)
def _three_cells() -> Iterator[None]:
    """test_cells.py's own, for the cluster: three cells, named for it before any client is made."""
    keys.use_cluster_cells(3)
    keys.use_cluster_layout(True)
    yield
    keys.use_cluster_cells()
    keys.use_cluster_layout(False)


def test_the_three_cells_lie_on_the_three_primaries(cluster: ClusterDeployment) -> None:
    owners = [cluster.primary_of(key_slot(tag.encode())) for tag in keys.layout()]
    assert len(keys.layout()) == 3 and len({owner.port for owner in owners if owner is not None}) == 3


async def test_a_job_of_every_cell_goes_through_and_each_primary_holds_its_cells_keys(
    cluster: ClusterDeployment, api: httpx.AsyncClient, redis: RedisClient, fake_worker: cells.MakeWorker
) -> None:
    assert isinstance(redis, RedisCluster)
    await cells.test_requests_through_the_api_lie_in_their_workers_cells_and_are_answered(api, fake_worker)
    for tag in keys.layout():
        owner = cluster.primary_of(key_slot(tag.encode()))
        assert owner is not None
        names = owner.client.keys("*")
        assert any(name.startswith(tag) for name in names), (tag, names)
        assert all(key_slot(name.encode()) in {key_slot(t.encode()) for t in keys.layout()} for name in names)


test_a_request_that_names_itself = cells.test_a_request_that_names_itself_is_admitted_in_its_names_cell
test_a_keys_limits_in_another_cell = (
    cells.test_a_keys_limits_in_another_cell_are_counted_apart_and_given_back_when_refused
)
test_a_stream_slot_taken_apart = cells.test_a_stream_slot_taken_apart_is_given_back_when_the_job_is_refused
test_a_dead_workers_job_moves = cells.test_a_dead_workers_job_moves_to_a_worker_of_its_cell_or_to_its_cells_shared_queue
test_deadlines_cell_by_cell = cells.test_deadlines_are_kept_and_ended_cell_by_cell
test_the_snapshot_reads_every_cell = cells.test_the_snapshot_reads_every_cell_and_counts_each_workers_lists
test_an_id_left_in_cell_0 = cells.test_a_workers_id_left_in_cell_0s_workers_is_read_in_its_own_cell_only
test_a_worker_takes_from_abroad = (
    cells.test_a_worker_takes_from_a_cell_whose_shared_queue_none_of_its_own_serves_and_finishes_there
)
test_a_lapsed_presence_abroad = (
    cells.test_a_job_held_abroad_by_a_worker_whose_presence_there_lapsed_goes_back_to_its_cells_queue
)
test_a_named_request_answered_from_abroad = (
    cells.test_a_named_request_whose_cell_has_no_worker_of_its_model_is_answered_from_abroad
)
test_limits_that_count_nothing = cells.test_a_keys_limits_that_count_nothing_name_no_key_of_another_cell
test_presence_kept_abroad = cells.test_a_worker_keeps_its_presence_where_it_runs_a_job_taken_from_abroad
