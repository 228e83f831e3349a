"""Every Redis key GPU Torrent uses, with its type, contents, TTL and writer.

The first four are the seed's contract (SPEC.md) and keep their names.

| key                     | type          | holds                                        | TTL                      | written by          |
|-------------------------|---------------|----------------------------------------------|--------------------------|---------------------|
| `worker:{worker_id}`    | string (JSON) | the worker's registration record             | none (removed on leave)  | coordinator         |
| `queue:{worker_id}`     | list          | job JSON, LPUSH by coordinator, BRPOP'd      | none                     | coordinator, worker |
| `result:{request_id}`   | string (JSON) | the finished (completed or failed) result    | `result_ttl_s` (1 h)     | worker              |
| `worker_index`          | integer       | the round-robin counter                      | none                     | coordinator         |
| `workers`               | set           | ids of every registered worker               | none                     | coordinator         |
| `heartbeat:{worker_id}` | string (JSON) | liveness and jobs in flight; absent = dead   | `heartbeat_ttl_s`        | worker              |
| `job:{request_id}`      | hash          | status (queued/running), worker, timestamps  | `result_ttl_s`           | coordinator, worker |
| `results:ready`         | pub/sub chan. | request ids whose result was just written    | n/a                      | worker              |

>>> queue_key("w1"), result_key("r1"), WORKER_INDEX
('queue:w1', 'result:r1', 'worker_index')
"""

from __future__ import annotations

WORKER_INDEX = "worker_index"
WORKERS = "workers"
RESULTS_CHANNEL = "results:ready"


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
