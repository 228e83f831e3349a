"""Whatever a client sends, the coordinator answers with a 4xx and a JSON error, never a 500."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.app import create_app
from gputorrent.embedded import free_port
from tests.conftest import wait_for

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
option_values = st.fixed_dictionaries(
    {},
    optional={name: json_values for name in ("max_tokens", "temperature", "top_p", "seed", "stop")},
)
inference_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "other"]) | json_values,
        "prompt": st.text(max_size=20) | json_values,
        "messages": st.lists(st.fixed_dictionaries({"role": st.text(max_size=10), "content": json_values}))
        | json_values,
        "options": option_values | json_values,
    },
)
register_bodies = st.fixed_dictionaries(
    {},
    optional={
        "worker_id": st.text(max_size=20) | json_values,
        "models": st.lists(st.text(max_size=10)) | json_values,
        "backend": json_values,
        "slots": json_values,
        "hardware": json_values,
    },
)


@pytest.fixture
def coordinator(coordinator_settings: CoordinatorSettings) -> Iterator[httpx.Client]:
    """The app under uvicorn in a thread (one server for every example), and a client for it."""
    port = free_port()
    # The registered worker must stay alive however long the examples take (a dead one makes every
    # admission a legitimate 503).
    settings = CoordinatorSettings(redis_url=coordinator_settings.redis_url, heartbeat_timeout_s=3600)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        client.post("/register", json={"worker_id": "w1", "models": ["m"], "backend": "fake"})
        yield client
    server.should_exit = True
    thread.join(timeout=10)


def _post(client: httpx.Client, path: str, body: object) -> httpx.Response:
    # allow_nan: JSON with NaN/Infinity is what a sloppy client sends, and Python's parser accepts it.
    content = json.dumps(body, allow_nan=True).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inference=inference_bodies, register=register_bodies)
def test_arbitrary_bodies_never_cause_a_500(coordinator: httpx.Client, inference: object, register: object) -> None:
    for response in (_post(coordinator, "/inference", inference), _post(coordinator, "/register", register)):
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["error"]["code"]
