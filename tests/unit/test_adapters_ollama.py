"""Ollama's wire format: requests to ours, results to Ollama's lines, the pool to tags/ps/show."""

from __future__ import annotations

from typing import Any

import ollama
import pytest

from gputorrent.coordinator.adapters import ollama as wire
from gputorrent.errors import InvalidRequest, ModelNotFound
from gputorrent.protocol import ErrorInfo, InferenceOptions, JobResult, PullProgress, Timings, Usage, WorkerState


def _chat(**fields: Any) -> wire.ChatRequest:
    return wire.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def _generate(**fields: Any) -> wire.GenerateRequest:
    return wire.GenerateRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def _worker(worker_id: str, *models: str, state: str = "alive", registered_at: float = 100.0) -> WorkerState:
    return WorkerState.model_validate(
        {
            "worker_id": worker_id,
            "models": list(models),
            "backend": "fake",
            "slots": 1,
            "hardware": {},
            "state": state,
            "jobs_in_flight": 0,
            "queue_length": 0,
            "last_heartbeat_at": None,
            "registered_at": registered_at,
        }
    )


def test_the_num_predict_ceiling_is_the_protocols() -> None:
    assert InferenceOptions.model_fields["max_tokens"].metadata[-1].le == wire.MAX_TOKENS


def test_streaming_is_on_unless_the_request_says_false() -> None:
    assert wire.chat_to_inference(_chat()).stream is True
    assert wire.chat_to_inference(_chat(stream=None)).stream is True
    assert wire.generate_to_inference(_generate(stream=False)).stream is False


def test_options_map_to_ours_and_the_rest_are_ignored() -> None:
    options = {"num_predict": 7, "temperature": 0.2, "top_p": 0.5, "seed": 3, "stop": "\n", "top_k": 40, "num_ctx": 9}
    mapped = wire.chat_to_inference(_chat(options=options)).options
    assert (mapped.max_tokens, mapped.temperature, mapped.top_p, mapped.seed, mapped.stop) == (7, 0.2, 0.5, 3, ["\n"])


@pytest.mark.parametrize("num_predict", [None, -1, -2, 0])
def test_unlimited_num_predict_is_the_pools_default(num_predict: int | None) -> None:
    mapped = wire.generate_to_inference(_generate(options={"num_predict": num_predict, "seed": -1})).options
    assert mapped.max_tokens == InferenceOptions().max_tokens
    assert mapped.seed is None  # Ollama's -1: a random seed


def test_a_huge_num_predict_is_lowered_to_the_ceiling() -> None:
    assert wire.chat_to_inference(_chat(options={"num_predict": 10**9})).options.max_tokens == wire.MAX_TOKENS


def test_an_option_out_of_our_range_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequest, match=r"options\.temperature"):
        wire.chat_to_inference(_chat(options={"temperature": 5}))


def test_generate_is_templated_as_a_chat_unless_raw() -> None:
    templated = wire.generate_to_inference(_generate(system="be brief"))
    assert templated.prompt is None and templated.messages is not None
    assert [(m.role, m.content) for m in templated.messages] == [("system", "be brief"), ("user", "hi")]
    raw = wire.generate_to_inference(_generate(system="ignored", raw=True))
    assert (raw.prompt, raw.messages) == ("hi", None)


def test_fields_we_cannot_honour_but_may_ignore_are_ignored() -> None:
    request = wire.generate_to_inference(
        _generate(keep_alive="5m", think=False, template="{{ .Prompt }}", context=[1, 2], images=[])
    )
    assert request.messages is not None and request.messages[-1].content == "hi"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize(("given", "expected"), [("json", "json"), (SCHEMA, SCHEMA), ("", None), (None, None)])
def test_format_is_json_or_a_schema_for_the_backend_to_follow(given: Any, expected: Any) -> None:
    assert wire.chat_to_inference(_chat(format=given)).options.format == expected
    assert wire.generate_to_inference(_generate(format=given)).options.format == expected


def test_a_format_that_is_neither_json_nor_a_schema_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequest, match='expected "json" or a JSON schema') as refused:
        wire.chat_to_inference(_chat(format="yaml"))
    assert refused.value.details["param"] == "format"
    with pytest.raises(InvalidRequest, match="lone surrogate") as unencodable:
        wire.generate_to_inference(_generate(format={"title": "\ud800"}))
    assert unencodable.value.details["param"] == "format"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_generate(images=["aGk="]), "images are not supported"),
        (_generate(suffix="return x"), "does not support insert"),
        (_chat(messages=[{"role": "user", "content": "hi", "images": ["aGk="]}]), "images are not supported"),
        (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), "does not support tools"),
        (_chat(messages=[{"role": "tool", "content": "42"}]), "role 'tool' is not supported"),
        (_chat(model="has space"), "model"),
    ],
)
def test_what_would_change_the_answer_is_refused(body: wire.ChatRequest | wire.GenerateRequest, message: str) -> None:
    convert = wire.chat_to_inference if isinstance(body, wire.ChatRequest) else wire.generate_to_inference
    with pytest.raises(InvalidRequest, match=message):
        convert(body)  # type: ignore[arg-type]


def test_an_empty_tools_list_is_what_the_ollama_client_always_sends() -> None:
    assert wire.chat_to_inference(_chat(tools=[])).messages is not None


def test_empty_requests_are_loads() -> None:
    assert wire.is_load(_chat(messages=[])) and wire.is_load(_chat(messages=None))
    assert wire.is_load(_generate(prompt="")) and not wire.is_load(_generate(prompt="", system="s"))
    assert wire.load_reply(_chat(messages=[]), "t") == {
        "model": "m",
        "created_at": "t",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "load",
    }


def _result(**fields: Any) -> JobResult:
    base: dict[str, Any] = {
        "request_id": "r",
        "status": "completed",
        "model": "m",
        "worker_id": "w",
        "output": "the answer",
        "finish_reason": "length",
        "usage": Usage(prompt_tokens=5, completion_tokens=2),
        "timings": Timings(queued_ms=1.5, inference_ms=20.25),
    }
    return JobResult(**{**base, **fields})


def test_final_line_stats_are_in_nanoseconds() -> None:
    assert wire.stats(_result()) == {
        "done_reason": "length",
        "total_duration": 21_750_000,
        "load_duration": 1_500_000,
        "prompt_eval_count": 5,
        "prompt_eval_duration": 0,
        "eval_count": 2,
        "eval_duration": 20_250_000,
    }
    assert wire.stats(_result(finish_reason=None))["done_reason"] == "stop"


def test_replies_whole_and_streamed() -> None:
    assert wire.chat_chunk("m", "t", "a") == {
        "model": "m",
        "created_at": "t",
        "message": {"role": "assistant", "content": "a"},
        "done": False,
    }
    whole = wire.chat_reply("m", "t", _result(), "the answer")
    assert whole["message"]["content"] == "the answer" and whole["done"] is True and whole["eval_count"] == 2
    generated = wire.generate_reply("m", "t", _result(), "", raw=False)
    assert (generated["response"], generated["done"], generated["context"]) == ("", True, [])
    assert "context" not in wire.generate_reply("m", "t", _result(), "", raw=True)


def test_resolve_model_follows_the_default_tag() -> None:
    assert wire.resolve_model("a", ["a"]) == "a"
    assert wire.resolve_model("a", ["a:latest"]) == "a:latest"
    assert wire.resolve_model("a:latest", ["a"]) == "a"
    assert wire.resolve_model("a:1b", ["a", "a:latest"]) is None
    assert wire.resolve_model("b", ["a"]) is None


def test_tags_ps_and_show_cover_live_workers_only() -> None:
    workers = [
        _worker("w2", "b", "a", registered_at=200.0),
        _worker("w1", "a", registered_at=100.0),
        _worker("dead", "c", state="dead"),
    ]
    listed = wire.tags(workers)["models"]
    assert [m["name"] for m in listed] == ["a", "b"]
    assert listed[0]["modified_at"] == "1970-01-01T00:01:40Z"  # the earliest live worker serving it
    assert len(listed[0]["digest"]) == 64 and listed[0]["digest"] != listed[1]["digest"]
    running = wire.ps(workers)["models"]
    assert [(m["name"], m["workers"]) for m in running] == [("a", ["w1", "w2"]), ("b", ["w2"])]
    assert running[0]["expires_at"] == wire.FOREVER and running[0]["size_vram"] == 0
    shown = wire.show("a", workers)
    assert shown["workers"] == ["w1", "w2"] and shown["model_info"] == {} and shown["capabilities"] == ["completion"]
    with pytest.raises(ModelNotFound, match=r"^model 'c' not found; the live workers serve: a, b$"):
        wire.show("c", workers)


def test_show_and_pull_take_model_or_its_deprecated_name() -> None:
    assert wire.requested_model(wire.ModelRequest(name="a")) == "a"
    assert wire.requested_model(wire.ModelRequest(model="b", name="a")) == "b"
    with pytest.raises(InvalidRequest, match="model is required"):
        wire.requested_model(wire.ModelRequest())


def test_a_pull_names_a_model_a_worker_could_register() -> None:
    assert wire.pulled_model(wire.PullRequest(name="qwen2.5:0.5b", insecure=True)) == "qwen2.5:0.5b"
    with pytest.raises(InvalidRequest, match="without whitespace") as caught:
        wire.pulled_model(wire.PullRequest(model="two words"))
    assert caught.value.details["param"] == "model"


def test_pull_lines_are_ollamas_with_the_worker_and_the_official_client_reads_them() -> None:
    """The `worker` field is ours; Ollama's `ProgressResponse` ignores fields it does not know."""
    progress = PullProgress(status="pulling 8934d96d3f08", digest="sha256:8934", total=10, completed=4)
    lines = [
        wire.pull_queued("w1"),
        wire.pull_progress("w1", progress),
        wire.pull_progress("w1", PullProgress(status="pulling manifest")),
        wire.pull_ended("w1", None),
        wire.pull_ended("w2", ErrorInfo(code="model_unavailable", message="file does not exist")),
    ]
    assert lines == [
        {"status": "queued on worker w1", "worker": "w1"},
        {"status": "pulling 8934d96d3f08", "digest": "sha256:8934", "total": 10, "completed": 4, "worker": "w1"},
        {"status": "pulling manifest", "worker": "w1"},
        {"status": "pulled onto worker w1", "worker": "w1"},
        {"status": "pull failed on worker w2: file does not exist", "worker": "w2"},
    ]
    read = [ollama.ProgressResponse(**line) for line in lines]
    assert (read[1].status, read[1].digest, read[1].total, read[1].completed) == (progress.status, "sha256:8934", 10, 4)
    assert "success" not in [r.status for r in read]  # clients take `success` for the end of the whole pull


def test_errors_are_a_bare_message() -> None:
    assert wire.error_body(404, "model 'x' not found", "model_not_found", None) == {"error": "model 'x' not found"}
    assert wire.error_line("boom") == {"error": "boom"}
