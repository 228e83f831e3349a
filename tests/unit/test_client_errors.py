import httpx
import pytest

from gputorrent.client._base import completed_or_raise, inference_body, raise_for_error
from gputorrent.errors import (
    GPUTorrentError,
    InvalidRequest,
    JobFailed,
    ModelNotFound,
    NotFound,
    NoWorkersAvailable,
    RequestTooLarge,
)
from gputorrent.protocol import ErrorInfo, JobResult


def _response(status: int, json: object) -> httpx.Response:
    return httpx.Response(status, json=json, request=httpx.Request("GET", "http://x/"))


def test_error_codes_map_back_to_their_classes() -> None:
    body = {"error": {"code": "model_not_found", "message": "no", "available_models": ["a"]}}
    with pytest.raises(ModelNotFound) as caught:
        raise_for_error(_response(404, body))
    assert caught.value.details == {"available_models": ["a"]}
    with pytest.raises(NoWorkersAvailable):
        raise_for_error(_response(503, {"error": {"code": "no_workers", "message": "none"}}))
    with pytest.raises(RequestTooLarge):
        raise_for_error(_response(413, {"error": {"code": "request_too_large", "message": "big"}}))


def test_bodies_without_our_error_shape_map_by_status() -> None:
    with pytest.raises(NotFound):
        raise_for_error(_response(404, {"detail": "Not Found"}))
    with pytest.raises(GPUTorrentError):
        raise_for_error(httpx.Response(500, text="boom", request=httpx.Request("GET", "http://x/")))


def test_success_passes() -> None:
    raise_for_error(_response(202, {"request_id": "r"}))


def test_a_failed_result_raises_job_failed_with_its_code() -> None:
    failed = JobResult(
        request_id="r", status="failed", model="m", worker_id="w", error=ErrorInfo(code="backend_error", message="down")
    )
    with pytest.raises(JobFailed) as caught:
        completed_or_raise(failed)
    assert (caught.value.code, caught.value.request_id, caught.value.message) == ("backend_error", "r", "down")


def test_bad_arguments_fail_before_any_request() -> None:
    with pytest.raises(InvalidRequest, match="exactly one of"):
        inference_body("m", None, None, None)
    with pytest.raises(InvalidRequest, match=r"options\.max_tokens"):
        inference_body("m", "p", None, {"max_tokens": 0})
    assert inference_body("m", "p", None, {"max_tokens": 3})["options"]["max_tokens"] == 3
