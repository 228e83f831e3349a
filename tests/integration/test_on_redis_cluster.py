"""The coordinator in process and workers on the fake backend, on a real three-primary Redis Cluster
(tests/cluster.py) through a `redis+cluster://` URL.

The tests below are the same functions as in their own modules, run again here with `redis_url` the
cluster's and `redis` a client of it: admission and results, round robin, cancellation, deadlines
(the reaper's), pull routing's shared queue, API keys, per-key rate and stream limits, and a key
revoked on another coordinator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import redis_client
from tests.integration import test_auth as auth_tests
from tests.integration import test_ending_jobs as ending_tests
from tests.integration import test_routes_native as native_tests
from tests.integration import test_routing_policies as routing_tests
from tests.integration.test_routes_native import MakeWorker


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    return cluster_url


# Run again here, on the cluster, with the fixtures their modules give them.
as_key = auth_tests.as_key
limited = auth_tests.limited
test_submit_then_result = native_tests.test_submit_then_result_goes_from_queued_to_completed
test_round_robin = native_tests.test_round_robin_alternates_between_workers_with_worker_index
test_cancel_queued = ending_tests.test_delete_ends_a_queued_job_at_once_and_it_never_runs
test_cancel_running = ending_tests.test_delete_stops_a_running_job_at_its_next_token
test_queued_job_past_its_deadline = ending_tests.test_a_queued_job_past_its_deadline_fails_with_code_timeout
test_running_job_past_its_deadline = ending_tests.test_a_running_job_past_its_deadline_fails_with_code_timeout
test_a_key_reads_only_its_own_requests = auth_tests.test_a_key_reads_only_its_own_requests
test_idempotency_keys_per_api_key = auth_tests.test_idempotency_keys_are_per_api_key_and_request_ids_are_not_shared
test_rate_limit = auth_tests.test_requests_past_the_minutes_limit_get_429_with_retry_after
test_stream_limit = auth_tests.test_a_key_may_hold_only_so_many_streams_open
test_key_revoked_elsewhere = (
    auth_tests.test_a_key_revoked_elsewhere_stops_working_here_though_this_coordinator_cached_it
)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_client.async_client(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("coordinator_settings", [{"routing": "pull"}], indirect=True)
async def test_pull_routing_shared_queue_with_deletion_and_deadlines(
    api: httpx.AsyncClient, fake_worker: MakeWorker, redis: Redis
) -> None:
    await routing_tests.test_delete_and_deadlines_end_a_job_on_the_shared_queue(api, fake_worker, redis)
