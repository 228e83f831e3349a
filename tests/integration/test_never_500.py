"""Whatever a client sends, the coordinator answers with a 4xx and a JSON error, never a 500."""

from __future__ import annotations

import asyncio
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.app import create_app

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
option_values = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": json_values,
        "temperature": json_values,
        "top_p": json_values,
        "seed": json_values,
        "stop": json_values,
    },
)
inference_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=20) | json_values,
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


def _post_all(settings_: CoordinatorSettings, requests: list[tuple[str, object]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        app = create_app(settings_)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://c") as api:
            await api.post("/register", json={"worker_id": "w1", "models": ["m"], "backend": "fake"})
            return [
                await api.post(
                    path,
                    content=json.dumps(body, allow_nan=True).encode(),
                    headers={"content-type": "application/json"},
                )
                for path, body in requests
            ]

    return asyncio.run(run())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inference=inference_bodies, register=register_bodies)
def test_arbitrary_bodies_never_cause_a_500(
    coordinator_settings: CoordinatorSettings, inference: object, register: object
) -> None:
    for response in _post_all(coordinator_settings, [("/inference", inference), ("/register", register)]):
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["error"]["code"]
