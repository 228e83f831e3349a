"""Every Redis key GPU Torrent uses, with its type, contents, TTL and writer.

`worker:`, `queue:`, `result:` and `worker_index` are the seed's contract (SPEC.md) and keep their names.

| key                   | type      | holds                                       | TTL            | writer      |
|-----------------------|-----------|---------------------------------------------|----------------|-------------|
| `worker:{worker_id}`  | string    | the registration record (JSON)              | none           | coordinator |
| `queue:{worker_id}`   | list      | jobs (JSON): LPUSH on admission, BLMOVE'd   | none           | both        |
| `processing:{id}`     | list      | the jobs a worker holds (its leases)        | none           | both        |
| `result:{request_id}` | string    | the finished result (JSON)                  | `result_ttl_s` | worker      |
| `worker_index`        | integer   | the round-robin counter                     | none           | coordinator |
| `workers`             | set       | ids of every registered worker              | none           | coordinator |
| `heartbeat:{id}`      | string    | last beat and jobs in flight; absent = dead | heartbeat TTL  | worker      |
| `job:{request_id}`    | hash      | status (queued/running), worker, model      | `result_ttl_s` | both        |
| `results:ready`       | channel   | ids of results just written (pub/sub)       | n/a            | worker      |
| `stream:{request_id}` | stream    | text entries, then one entry with the result | `result_ttl_s` | worker      |
| `cancel:{request_id}` | string    | present: the job was ended (cancelled, timed out) | `result_ttl_s` | coordinator |
| `deadlines`           | zset      | request ids by deadline (unix s)            | none: left with the result | both |
| `idempotency:{key}`   | string    | the request id a client's key admitted      | `result_ttl_s` | coordinator |
| `jobs:ended`          | channel   | ids of jobs ended before their worker finished | n/a         | coordinator |

>>> queue_key("w1"), result_key("r1"), WORKER_INDEX
('queue:w1', 'result:r1', 'worker_index')
"""

from __future__ import annotations

WORKER_INDEX = "worker_index"
WORKERS = "workers"
RESULTS_CHANNEL = "results:ready"
DEADLINES = "deadlines"
ENDED_CHANNEL = "jobs:ended"


def worker_key(worker_id: str) -> str:
    """The registration record of one worker."""
    return f"worker:{worker_id}"


def queue_key(worker_id: str) -> str:
    """The job queue of one worker."""
    return f"queue:{worker_id}"


def result_key(request_id: str) -> str:
    """The stored result of one request."""
    return f"result:{request_id}"


def heartbeat_key(worker_id: str) -> str:
    """Present while the worker is alive; expires when its heartbeats stop."""
    return f"heartbeat:{worker_id}"


def job_key(request_id: str) -> str:
    """The status of a request between admission and result."""
    return f"job:{request_id}"


def stream_key(request_id: str) -> str:
    """The tokens of a streamed request, as they are generated."""
    return f"stream:{request_id}"


def cancel_key(request_id: str) -> str:
    """Present once the client has given up on the request (it disconnected from its stream)."""
    return f"cancel:{request_id}"


def processing_key(worker_id: str) -> str:
    """The jobs a worker has taken and not finished: moved here from its queue in one step."""
    return f"processing:{worker_id}"


def idempotency_key(key: str) -> str:
    """The request id that a client's idempotency key (or its own request id) was admitted as."""
    return f"idempotency:{key}"
