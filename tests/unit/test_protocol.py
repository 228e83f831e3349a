import json

import pytest
from pydantic import ValidationError

from gputorrent.protocol import FORMAT_MAX_DEPTH, InferenceOptions, InferenceRequest, Job, WorkerRegistration


def test_request_takes_a_prompt() -> None:
    request = InferenceRequest.model_validate({"model": "m", "prompt": "hi"})
    assert request.prompt == "hi"
    assert request.options == InferenceOptions()


def test_request_takes_messages() -> None:
    request = InferenceRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert request.messages is not None and request.messages[0].content == "hi"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_request_needs_exactly_one_of_prompt_or_messages(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="exactly one of 'prompt' or 'messages'"):
        InferenceRequest.model_validate(body)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"max_token": 5}, "max_token"),
        ({"format": "xml"}, "format"),
        ({"format": ["json"]}, "format"),
        ({"format": {"title": "\ud800"}}, "format"),
        ({"format": json.loads('{"a":' * (FORMAT_MAX_DEPTH + 1) + "1" + "}" * (FORMAT_MAX_DEPTH + 1))}, "format"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        InferenceOptions.model_validate(options)
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


def test_format_is_json_a_schema_or_none() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert [InferenceOptions.model_validate({"format": f}).format for f in ("json", schema, None)] == [
        "json",
        schema,
        None,
    ]


def test_stop_accepts_a_single_string_as_openai_does() -> None:
    assert InferenceOptions.model_validate({"stop": "\n"}).stop == ["\n"]
    assert InferenceOptions.model_validate({"stop": None}).stop == []


def test_unknown_request_fields_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        InferenceRequest.model_validate({"model": "m", "prompt": "p", "temprature": 1})
    assert caught.value.errors()[0]["loc"] == ("temprature",)


def test_model_names_with_whitespace_are_refused() -> None:
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate({"model": "bad name", "prompt": "p"})
    with pytest.raises(ValidationError):
        WorkerRegistration.model_validate({"models": ["bad name"], "backend": "fake"})


def test_registration_needs_a_model_and_a_safe_worker_id() -> None:
    with pytest.raises(ValidationError):
        WorkerRegistration.model_validate({"models": [], "backend": "fake"})
    with pytest.raises(ValidationError):
        WorkerRegistration.model_validate({"worker_id": "a b", "models": ["m"], "backend": "fake"})
    assert WorkerRegistration.model_validate({"models": ["m"], "backend": "fake"}).slots == 1


def test_a_job_with_the_deepest_format_taken_is_written_and_read_back() -> None:
    deepest = json.loads('{"a":' * (FORMAT_MAX_DEPTH - 1) + "{}" + "}" * (FORMAT_MAX_DEPTH - 1))
    job = Job(request_id="r", worker_id="w", model="m", prompt="p", enqueued_at=1.0)
    job = job.model_copy(update={"options": InferenceOptions(format=deepest)})
    assert Job.model_validate_json(job.model_dump_json()).options.format == deepest


def test_a_job_without_a_format_is_written_as_before_the_field_existed() -> None:
    """Workers older than `format` refuse unknown fields: a job that does not use it must not carry it."""
    job = Job(request_id="r", worker_id="w", model="m", prompt="p", enqueued_at=1.0)
    assert "format" not in job.model_dump_json()
    formatted = job.model_copy(update={"options": InferenceOptions(format={"type": "object"})})
    assert Job.model_validate_json(formatted.model_dump_json()).options.format == {"type": "object"}
