"""Errors, each with a stable `code` and the HTTP status it maps to.

    GPUTorrentError                  500 internal_error
    ├── InvalidRequest               422 invalid_request
    ├── RequestTooLarge              413 request_too_large
    ├── Unauthorized                 401 unauthorized         (no API key, or not a live one)
    ├── Forbidden                    403 forbidden            (the key's scope does not allow it)
    ├── Conflict                     409 conflict             (e.g. a request id another key uses)
    │   └── LeaseLost                409 lease_lost           (a worker wrote to a job it does not hold)
    ├── RateLimited                  429 rate_limited         (carries `retry_after_s`)
    │   └── SlotsFull                429 slots_full           (a worker's takes would pass its registered slots)
    ├── WorkerGone                   410 worker_gone          (a worker's credential is valid, its registration gone)
    ├── NotFound                     404 not_found
    │   ├── ModelNotFound            404 model_not_found      (carries the models live workers serve)
    │   └── RequestNotFound          404 request_not_found
    ├── ServiceUnavailable           503 service_unavailable
    │   ├── NoWorkersAvailable       503 no_workers
    │   ├── NoShardsAvailable        503 no_shards
    │   └── RedisUnavailable         503 redis_unavailable
    ├── BackendError                 502 backend_error        (a worker's backend failed a job)
    │   ├── BackendUnavailable       502 backend_unavailable  (unreachable or 5xx: another worker may do)
    │   └── ModelUnavailable         502 model_unavailable    (the model cannot be found or pulled)
    ├── Cancelled                    409 cancelled            (the job was ended before its result)
    ├── DeadlineExceeded             504 timeout              (the job passed its deadline)
    ├── JobFailed                    per the job's code       (a result with status failed; the native API
    │                                                          returns it as a 200 result, the others as an
    │                                                          error with the code's status, else 502)
    └── ResultTimeout                504 result_timeout       (client side: no result within the wait)

The coordinator turns these into `{"error": {"code", "message", ...}}` in one handler; the
client turns that body back into the same classes in one place.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GPUTorrentError(Exception):
    """Base of every GPU Torrent error."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class InvalidRequest(GPUTorrentError):
    code = "invalid_request"
    http_status = 422


class RequestTooLarge(GPUTorrentError):
    code = "request_too_large"
    http_status = 413


class Unauthorized(GPUTorrentError):
    code = "unauthorized"
    http_status = 401


class Forbidden(GPUTorrentError):
    code = "forbidden"
    http_status = 403


class Conflict(GPUTorrentError):
    code = "conflict"
    http_status = 409


class LeaseLost(Conflict):
    """A worker asked to write to a job that is not leased to it (ended, handed on, or never its own)."""

    code = "lease_lost"


class RateLimited(GPUTorrentError):
    """A per-key limit is reached; `retry_after_s` says when to try again (the `Retry-After` header)."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class SlotsFull(RateLimited):
    """A worker asked for more jobs than the slots it registered: it holds (or is taking) that many."""

    code = "slots_full"


class WorkerGone(GPUTorrentError):
    """The worker's credential is valid but it is no longer registered (removed, or it left): it
    registers again, or stops."""

    code = "worker_gone"
    http_status = 410


class NotFound(GPUTorrentError):
    code = "not_found"
    http_status = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestNotFound(NotFound):
    code = "request_not_found"


class ServiceUnavailable(GPUTorrentError):
    code = "service_unavailable"
    http_status = 503


class NoWorkersAvailable(ServiceUnavailable):
    code = "no_workers"


class NoShardsAvailable(ServiceUnavailable):
    """A group asked for shard hosts the pool cannot give (too few, or lending too little memory)."""

    code = "no_shards"


class RedisUnavailable(ServiceUnavailable):
    code = "redis_unavailable"


class BackendError(GPUTorrentError):
    code = "backend_error"
    http_status = 502


class BackendUnavailable(BackendError):
    """The backend cannot serve at all right now (unreachable, or a server error): another worker may."""

    code = "backend_unavailable"


class ModelUnavailable(BackendError):
    code = "model_unavailable"


class Cancelled(GPUTorrentError):
    code = "cancelled"
    http_status = 409


class DeadlineExceeded(GPUTorrentError):
    """The job ran past its deadline (the request's `timeout_s`, or the coordinator's default)."""

    code = "timeout"
    http_status = 504


class JobFailed(GPUTorrentError):
    """A job ended with status `failed`; `code` is the job's own error code, and the status is that
    code's own where it has one (504 for `timeout`, 409 for `cancelled`), else 502."""

    http_status = 502

    def __init__(self, message: str, *, request_id: str, code: str) -> None:
        super().__init__(message, request_id=request_id)
        self.request_id = request_id
        self.code = code  # type: ignore[misc]
        known = ERRORS_BY_CODE.get(code)
        if known is not None and known.http_status != 500:
            self.http_status = known.http_status  # type: ignore[misc]


class ResultTimeout(GPUTorrentError):
    code = "result_timeout"
    http_status = 504


ERRORS_BY_CODE: dict[str, type[GPUTorrentError]] = {
    cls.code: cls
    for cls in (
        GPUTorrentError,
        InvalidRequest,
        RequestTooLarge,
        Unauthorized,
        Forbidden,
        Conflict,
        RateLimited,
        SlotsFull,
        WorkerGone,
        NotFound,
        ModelNotFound,
        RequestNotFound,
        ServiceUnavailable,
        NoWorkersAvailable,
        RedisUnavailable,
        BackendError,
        BackendUnavailable,
        ModelUnavailable,
        Cancelled,
        DeadlineExceeded,
        ResultTimeout,
    )
}
