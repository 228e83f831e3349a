"""The pool on a real Redis Cluster: three primaries, and coordinator and worker processes given only
the `redis+cluster://` URL.

The tests imported below are the same functions as in their own modules, run again here with
`redis_url` the cluster's: every API family through its official client (OpenAI, Ollama,
Anthropic, and the native API through GPU Torrent's own), streams, cancellation, a worker's
failover, API keys (`gputorrent keys`, revocation), the dashboard in Chromium, the metrics and
the pool's event stream; model pulls are in test_on_redis_cluster_pulls.py. The test of this
module's own checks where the keys went.
"""

from __future__ import annotations

import time
import zlib

import httpx
import pytest
from redis.crc import key_slot

from gputorrent import keys, queue
from tests.cluster import ClusterDeployment
from tests.e2e import test_anthropic_api as anthropic_api
from tests.e2e import test_auth as auth_e2e
from tests.e2e import test_dashboard as dashboard
from tests.e2e import test_observability as observability
from tests.e2e import test_ollama_api as ollama_api
from tests.e2e import test_openai_api as openai_api
from tests.e2e import test_processes as native_api
from tests.e2e.test_openai_api import StartWorker


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    return cluster_url


# Run again here, on the cluster, with the fixtures their modules give them.
_close_openai_clients = openai_api._close_clients
_close_anthropic_clients = anthropic_api._close_clients
client = ollama_api.client
test_openai_chat = openai_api.test_chat_completion
test_openai_chat_streams = openai_api.test_chat_streams_chunks_in_order_with_usage_last
test_openai_errors = openai_api.test_errors_surface_as_the_sdks_own_exceptions
test_openai_stream_left_cancels_its_job = openai_api.test_a_client_that_leaves_a_stream_cancels_its_job
test_ollama_chat_and_generate = ollama_api.test_chat_and_generate_answer_in_one_object_without_streaming
test_ollama_chat_streams = ollama_api.test_chat_streams_chunks_as_they_are_generated
test_ollama_listings = ollama_api.test_list_ps_and_show_describe_what_live_workers_serve
test_anthropic_stream = anthropic_api.test_create_with_stream_yields_anthropics_event_sequence
test_anthropic_stream_left_cancels_its_job = anthropic_api.test_a_client_that_leaves_a_stream_cancels_its_job
test_native_client = native_api.test_client_infer_through_coordinator_and_worker_processes
test_native_retries_and_cancel = native_api.test_client_retries_with_its_request_id_get_one_job_and_cancel_ends_it
test_native_spread_over_two_workers = native_api.test_jobs_submitted_together_are_spread_over_two_worker_processes
test_native_stream = native_api.test_native_stream_sends_queued_then_tokens_then_the_result
test_job_survives_kill_9_of_its_worker = native_api.test_a_job_survives_kill_9_of_its_worker_and_completes_on_another
pool = auth_e2e.pool  # authentication on, a worker joined with a join key
test_keys_with_the_official_clients = (
    auth_e2e.test_the_official_clients_send_their_keys_and_a_wrong_key_is_their_auth_error
)
test_keys_cli_and_revoking = auth_e2e.test_the_cli_reads_its_key_from_the_environment_and_revoking_it_locks_it_out
drive = dashboard.drive
test_dashboard = dashboard.test_the_dashboard_shows_the_workers_their_states_jobs_and_failures
test_dashboard_playground = dashboard.test_the_playground_streams_a_completion_token_by_token
test_metrics = observability.test_metrics_counters_move_after_a_request
test_pool_events = observability.test_pool_events_send_the_overview_again_and_again


def test_every_key_of_the_pool_lies_in_its_cell_on_the_primary_serving_the_cells_slot(
    cluster: ClusterDeployment, coordinator_url: str, start_worker: StartWorker
) -> None:
    """Twelve cells, four on each primary; w1's keys in its cell, and no key outside the cells."""
    test_openai_chat(coordinator_url, start_worker)  # worker w1 joins, a job goes through
    tags = keys.cluster_tags(keys.CLUSTER_CELLS)
    owners = {tag: cluster.primary_of(key_slot(tag.encode())) for tag in tags}
    assert sorted(sum(owner is node for owner in owners.values()) for node in cluster.primaries()) == [4, 4, 4]
    w1 = tags[zlib.crc32(b"w1") % len(tags)]  # keys.cell_of on the cluster's cells
    assert w1 != tags[0]
    found: set[str] = set()
    for tag, owner in owners.items():
        assert owner is not None
        names = owner.client.keys(tag + "*")  # a tag has no glob character
        assert all(key_slot(name.encode()) == key_slot(tag.encode()) for name in names), names
        found |= set(names)
    assert {f"{w1}workers", f"{w1}worker:w1", f"{w1}heartbeat:w1"} <= found, found
    assert sum(node.client.dbsize() for node in cluster.primaries()) == len(found)  # no key outside the cells


def test_each_cells_results_are_announced_on_its_shard_channel_where_the_coordinator_listens(
    cluster: ClusterDeployment, coordinator_url: str, start_worker: StartWorker
) -> None:
    """A result is announced with `SPUBLISH` on its cell's channel, by the primary serving the cell,
    and the coordinator reads each primary's channels there: no announcement crosses the cluster bus
    (docs/scaling.md, "The cluster's p99")."""
    start_worker("w1")
    channels = [f"{tag}{keys.RESULTS_CHANNEL}" for tag in keys.cluster_tags(keys.CLUSTER_CELLS)]
    w1_channel = channels[zlib.crc32(b"w1") % len(channels)]
    owner = cluster.primary_of(key_slot(w1_channel.encode()))
    assert owner is not None
    for node in cluster.primaries():  # the coordinator's listener, on every cell's channel where it lives
        served = [c for c in channels if cluster.primary_of(key_slot(c.encode())) is node]
        counts = node.client.execute_command("PUBSUB", "SHARDNUMSUB", *served)
        assert all(int(count) >= 1 for count in counts[1::2]), (node.port, counts)
        assert node.client.execute_command("PUBSUB", "NUMSUB", keys.RESULTS_CHANNEL)[1] == 0
    with owner.client.pubsub(ignore_subscribe_messages=True) as listening:
        listening.ssubscribe(w1_channel)
        accepted = httpx.post(f"{coordinator_url}/inference", json={"model": "fake", "prompt": "shard"}, timeout=10)
        assert accepted.status_code == 202, accepted.text
        request_id = accepted.json()["request_id"]
        result = httpx.get(f"{coordinator_url}/result/{request_id}", params={"wait": 10}, timeout=15).json()
        assert result["status"] == "completed"
        deadline = time.monotonic() + 10
        while (heard := listening.get_message(timeout=0.5)) is None and time.monotonic() < deadline:
            pass
    assert heard is not None and heard["type"] == "smessage"
    assert queue.read_announcement(heard["data"])[0] == request_id
