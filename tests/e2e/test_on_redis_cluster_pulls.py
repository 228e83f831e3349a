"""Model pulls on a real Redis Cluster (tests/cluster.py): the tests of test_ollama_pull.py, run again
here with `redis_url` the cluster's `redis+cluster://` URL, against the stand-in for Ollama's
documented protocol (NOT Ollama: tests/ollama_standin.py)."""

from __future__ import annotations

import pytest

from tests.e2e import test_ollama_pull as pulls


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    return cluster_url


# Run again here, on the cluster, with the fixture their module gives them.
pool = pulls.pool
test_pulls_with_progress_documented_protocol = (
    pulls.test_the_ollama_client_pulls_onto_both_kinds_of_worker_with_progress_then_generates_documented_protocol
)
test_a_client_that_leaves_a_pull_stops_it_documented_protocol = (
    pulls.test_a_client_that_leaves_a_pull_stops_it_and_frees_its_worker_documented_protocol
)
