"""Job queue operations, shared by coordinator and worker: one module per transition of a job.

A request is findable in Redis from admission to result: `job:{request_id}` holds its status (and
the job itself) while it is queued or running, its request id waiting in a queue or held in a
worker's processing list, and `result:{request_id}` holds the result after; the switch
from one to the other is a single transaction. Each transition is one Lua script with named keys
and arguments (`gputorrent/scripts.py`):

- `admit`: recorded as queued and pushed onto the list it waits in, within its limits;
- `take`: moved from a queue into the taker's processing list (its lease);
- `finish`: out of the list that holds it, with its result stored and announced;
- `move`: back to a queue (its holder died or left), or failed after too many tries;
- `end`: failed before its worker finished it (cancelled, timed out).
"""

from gputorrent.queue.admit import (
    RATE_COUNT,
    REFUSALS,
    STREAM_SLOT_FREE,
    STREAM_SLOT_TAKE,
    AdmittedBefore,
    LimitArgs,
    LimitKeys,
    Limits,
    Refusal,
    Refused,
    WorkerGone,
    enqueue,
    next_round_robin,
)
from gputorrent.queue.end import end, lookup
from gputorrent.queue.finish import announces_result, finish, read_announcement
from gputorrent.queue.lists import JOB_FIELD, bodies, doorbell_key, waiting_key, waiting_keys
from gputorrent.queue.move import requeue, retry_or_fail
from gputorrent.queue.take import ABROAD_HINT_TTL_S, Lease, held_jobs, pop, read_held, recover

__all__ = [
    "ABROAD_HINT_TTL_S", "JOB_FIELD", "RATE_COUNT", "REFUSALS", "STREAM_SLOT_FREE", "STREAM_SLOT_TAKE",
    "AdmittedBefore", "Lease", "LimitArgs", "LimitKeys", "Limits", "Refusal", "Refused", "WorkerGone",
    "announces_result", "bodies",
    "doorbell_key", "end", "enqueue", "finish", "held_jobs", "lookup", "next_round_robin", "pop", "read_announcement",
    "read_held", "recover", "requeue", "retry_or_fail", "waiting_key", "waiting_keys",
]  # fmt: skip
