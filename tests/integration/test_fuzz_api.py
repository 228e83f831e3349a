"""Schemathesis against the coordinator's own OpenAPI schema: every operation, generated requests,
no 5xx and no answer the schema does not describe (status, content type, body)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gputorrent import auth
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.app import create_app
from gputorrent.embedded import free_port
from tests.conftest import wait_for

EXAMPLES_PER_OPERATION = 25  # bounded for CI; raise it locally to search harder


@schemathesis.check
def no_internal_error(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """No 500. A 502, 503 or 504 is an answer by design (the job failed, no worker or Redis, no result
    in time) that the schema documents; a 500 is a bug."""
    if response.status_code == 500:
        raise AssertionError(f"500 Internal Server Error: {response.text[:300]}")


CHECKS = [no_internal_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def coordinator(redis_url: str) -> Iterator[tuple[str, str, str]]:
    """A live coordinator (uvicorn in a thread) with one registered fake worker that never runs, an
    admin key and that worker's credential; yields (base URL, key, credential). Waits are short so a
    generated request never holds the run up."""
    # A generated /register may say can_pull: a pull onto such a worker (which never runs) ends at its deadline.
    settings = CoordinatorSettings(
        redis_url=redis_url, heartbeat_timeout_s=3600, max_sync_wait_s=0.3, max_result_wait_s=0.3, pull_timeout_s=0.3
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    _, key = auth.new_key()
    asyncio.run(_store(redis_url, key))
    registered = httpx.post(
        f"http://127.0.0.1:{port}/register", json={"worker_id": "w1", "models": ["m"], "backend": "fake"},
        headers={"Authorization": f"Bearer {key}"}, timeout=10,
    ).json()  # fmt: skip
    yield f"http://127.0.0.1:{port}", key, f"w1:{registered['worker_secret']}"
    server.should_exit = True
    thread.join(timeout=10)


async def _store(redis_url: str, key: str) -> None:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await auth.store_key(redis, key, "fuzz", "admin")
    await redis.aclose()


def test_every_operation_answers_as_its_schema_says(coordinator: tuple[str, str, str]) -> None:
    # Driven through Hypothesis directly: schemathesis's pytest plugin does not load under pytest 9.
    base_url, key, worker_credential = coordinator
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25  # every route of every API family is in the schema
    # An endless event stream (the dashboard's) has no end to validate; it has its own tests.
    operations = [op for op in operations if not op.path.endswith("/events")]
    for operation in operations:
        # The worker routes take a worker's credential, every other route an API key.
        bearer = worker_credential if operation.path.startswith("/worker/") else key
        _fuzz(operation, base_url, {"Authorization": f"Bearer {bearer}"})


def _fuzz(operation: schemathesis.APIOperation, base_url: str, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)

    answers_as_documented()
