"""Property tests of the wire models: anything a client or a worker can send is either a valid model
or a `ValidationError`, and every valid model survives its own JSON unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from gputorrent.protocol import (
    ApiKeyRequest,
    EmbeddingRequest,
    Heartbeat,
    InferenceRequest,
    Job,
    JobResult,
    WorkerBeat,
    WorkerRegistration,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
texts = st.text(max_size=40)
options = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(-5, 40000) | json_values,
        "temperature": st.floats(allow_nan=True) | json_values,
        "top_p": st.floats() | json_values,
        "seed": st.integers(-5, 2**33) | json_values,
        "stop": st.lists(texts, max_size=20) | texts | json_values,
    },
)
inference_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "gemma3:270m", "has space", ""]) | json_values,
        "prompt": texts | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": texts})
        )
        | json_values,
        "options": options | json_values,
        "stream": st.booleans() | json_values,
        "request_id": st.text(max_size=140) | json_values,
        "timeout_s": st.floats() | json_values,
        "surprise": json_values,
    },
)
numbers = st.integers() | st.floats()  # NaN and infinities included: JSON has neither
usage = st.fixed_dictionaries({}, optional={"prompt_tokens": numbers, "completion_tokens": numbers})
timings = st.fixed_dictionaries(
    {}, optional={"queued_ms": numbers, "inference_ms": numbers, "first_token_ms": numbers | st.none()}
)
histogram = st.fixed_dictionaries({"counts": st.lists(numbers, min_size=15, max_size=15), "sum_s": numbers})
telemetry = st.fixed_dictionaries(
    {"sampled_at": numbers},
    optional={
        "machine": st.fixed_dictionaries({}, optional={"cpu_utilization_ratio": numbers, "ram_used_bytes": numbers}),
        "jobs": st.dictionaries(
            texts, st.fixed_dictionaries({}, optional={"completed": numbers, "latency": histogram})
        ),
    },
)
heartbeat_bodies = st.fixed_dictionaries(
    {"at": numbers},
    optional={"jobs_in_flight": numbers, "tokens_per_s": numbers | st.none(), "telemetry": telemetry},
)
# What a worker linked through the coordinator sends: its beats and its results.
worker_bodies = (
    heartbeat_bodies
    | st.fixed_dictionaries({"heartbeat": heartbeat_bodies})
    | st.fixed_dictionaries(
        {"request_id": st.just("r-12345678"), "status": st.just("completed"), "model": texts, "worker_id": texts},
        optional={"usage": usage, "timings": timings},
    )
)
MODELS_FROM_OUTSIDE: list[type[BaseModel]] = [
    InferenceRequest, EmbeddingRequest, WorkerRegistration, ApiKeyRequest, Heartbeat, WorkerBeat, JobResult,
]  # fmt: skip


@pytest.mark.parametrize("model", MODELS_FROM_OUTSIDE, ids=lambda m: m.__name__)
@settings(max_examples=300, deadline=None)
@given(body=json_values | inference_bodies | worker_bodies)
def test_any_input_is_a_valid_model_or_a_validation_error(model: type[BaseModel], body: Any) -> None:
    try:
        parsed = model.model_validate(body)
    except ValidationError:
        return
    assert model.model_validate_json(parsed.model_dump_json()) == parsed


@settings(max_examples=300, deadline=None)
@given(body=inference_bodies)
def test_a_valid_request_is_one_the_coordinator_can_write_back_as_utf8_json(body: dict[str, Any]) -> None:
    try:
        request = InferenceRequest.model_validate(body)
    except ValidationError:
        return
    assert (request.prompt is None) != (request.messages is None)
    json.loads(request.model_dump_json().encode("utf-8"))  # no lone surrogate slipped through
    assert 1 <= request.options.max_tokens <= 32768


@settings(max_examples=300, deadline=None)
@given(body=worker_bodies)
def test_a_workers_figures_are_finite_and_not_negative(body: dict[str, Any]) -> None:
    for model in (Heartbeat, WorkerBeat, JobResult):
        try:
            parsed = model.model_validate(body)
        except ValidationError:
            continue
        figures = json.loads(parsed.model_dump_json())
        assert all(0 <= n < 1e30 for n in _numbers(figures)), figures


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


jobs = st.builds(
    Job,
    request_id=st.text(min_size=1, max_size=40),
    worker_id=st.text(min_size=1, max_size=40),
    model=texts,
    prompt=st.none() | texts,
    enqueued_at=st.floats(0, 2e9),
    deadline=st.none() | st.floats(0, 2e9),
    attempt=st.integers(1, 10),
    continuation=st.none() | texts,
    continuation_tokens=st.integers(0, 1000),
    stream=st.booleans(),
)
results = st.builds(
    JobResult,
    request_id=st.text(min_size=1, max_size=40),
    status=st.sampled_from(["completed", "failed"]),
    model=texts,
    worker_id=texts,
    output=st.none() | st.text(),
    embeddings=st.none() | st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(item=jobs | results)
def test_jobs_and_results_survive_their_trip_through_redis(item: Job | JobResult) -> None:
    assert type(item).model_validate_json(item.model_dump_json()) == item
