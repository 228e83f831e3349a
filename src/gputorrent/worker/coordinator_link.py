"""`CoordinatorLink`: a worker without Redis credentials, reaching the pool only through the
coordinator's `/worker` routes (see `link.py` for the interface, `docs/security.md` for why).

Every call carries `Authorization: Bearer <worker_id>:<worker_secret>`; the coordinator checks it
and runs the same lease-checked functions a Redis-linked worker runs, as that worker only. A 409
(`lease_lost`) means the job is not this worker's (any more): its write was refused. A 410
(`worker_gone`) to a take means the worker is no longer registered: it stops (`WorkerGone`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from gputorrent import queue
from gputorrent.errors import WorkerGone
from gputorrent.protocol import (
    BeatAnswer,
    ErrorInfo,
    Group,
    HandOn,
    Heartbeat,
    JobResult,
    Left,
    Moved,
    OrphanCheck,
    Orphans,
    StreamText,
    Taken,
    WorkerBeat,
)
from gputorrent.worker.ended import EndedJobs
from gputorrent.worker.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
TAKE_EXTRA_S = 10.0  # a take waits up to its long poll; the connection may take this much longer
LONGEST_TAKE_S = 5.0  # the longest long poll the coordinator grants (its TAKE_WAIT_MAX_S)
HEARTBEAT_TIMEOUT_S = 5.0
M = TypeVar("M", bound=BaseModel)


class CoordinatorUnreachable(ConnectionError):
    """The coordinator could not be reached, failed (5xx), or refused the worker's credentials; the
    worker's loops retry it as they retry a Redis outage."""


def credential(worker_id: str, worker_secret: str) -> str:
    """What a worker sends as `Authorization: Bearer ...` (secrets hold no `:`; ids may)."""
    return f"{worker_id}:{worker_secret}"


def _message(body: bytes) -> str:
    return body[:300].decode(errors="replace")


def _parse(model: type[M], body: bytes) -> M:
    """A 2xx answer's body; one that is not ours (a proxy's HTML page, a cut connection) counts as
    an outage, retried like one, not as a crash of the loop that asked."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise CoordinatorUnreachable(
            f"unreadable answer from the coordinator ({e.error_count()} errors): {_message(body)}"
        ) from None


class CoordinatorLink:
    """The pool's state through the coordinator at `coordinator_url`, as worker `worker_id`."""

    # A take's reply arrives (or the take gives up) within its long poll plus TAKE_EXTRA_S: a job
    # unheld on two looks this far apart is an orphan, not a reply still on its way.
    orphan_check_s = LONGEST_TAKE_S + TAKE_EXTRA_S
    # The coordinator's take runs on after its client leaves: cut off, it could move a job into the
    # processing list of a worker that has left by then, for the reaper to find only at its deadline.
    takes_cancel_at_once = False

    def __init__(self, coordinator_url: str, worker_id: str, worker_secret: str) -> None:
        self.worker_id = worker_id
        self._base = coordinator_url.rstrip("/") + "/worker"
        self._headers = {"authorization": f"Bearer {credential(worker_id, worker_secret)}"}
        self._http = aiohttp.ClientSession(
            headers={**self._headers, "content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
        )

    async def _call(
        self, method: str, path: str, body: BaseModel | None = None, *, timeout_s: float = CALL_TIMEOUT_S,
        params: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:  # fmt: skip
        """The status and body of one call; a transport failure, a 5xx, 401, 403 or 429 raise
        `CoordinatorUnreachable` (retried by the caller's loop)."""
        data = body.model_dump_json() if body is not None else None
        try:
            async with self._http.request(
                method, self._base + path, data=data, params=params, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                status, content = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CoordinatorUnreachable(f"cannot reach the coordinator: {e!r}") from None
        if status >= 500 or status in (401, 403, 429):
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        return status, content

    async def _expect(self, method: str, path: str, body: BaseModel | None = None) -> bytes:
        """The body of a call that has no reason to fail but an outage."""
        status, content = await self._call(method, path, body)
        if status >= 300:
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        return content

    async def recover(self) -> int:
        return _parse(Moved, await self._expect("POST", "/recover")).jobs

    async def take(self, timeout_s: float, models: Sequence[str], *, wait_first: bool = False) -> queue.Lease | None:
        # The models are those of the worker's registration, which the coordinator reads itself; it
        # looks before it waits whatever `wait_first` says (one request either way).
        timeout_s = min(timeout_s, LONGEST_TAKE_S)
        status, content = await self._call(
            "POST", "/take", params={"wait_s": repr(timeout_s)}, timeout_s=timeout_s + TAKE_EXTRA_S
        )
        if status == 204:
            return None
        if status == 410:  # its registration is gone: retrying cannot help
            raise WorkerGone(f"the coordinator no longer knows worker {self.worker_id}: {_message(content)}")
        if status != 200:
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        taken = _parse(Taken, content)
        return queue.Lease(job=taken.job, streamed_before=taken.streamed_before, taken_at=time.time())

    async def sent_so_far(self, request_id: str) -> tuple[str, int]:
        status, content = await self._call("GET", f"/jobs/{request_id}/stream")
        if status == 409:  # no longer this worker's: it runs it anyway, and its writes will be refused
            return "", 0
        if status != 200:
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        sent = _parse(StreamText, content)
        return sent.text, sent.tokens

    async def append(self, lease: queue.Lease, text: str, tokens: int) -> bool:
        request_id = lease.job.request_id
        status, content = await self._call("POST", f"/jobs/{request_id}/stream", StreamText(text=text, tokens=tokens))
        if status >= 300 and status != 409:
            log.error("request %s: the coordinator refused stream text (%d): %s", request_id, status, _message(content))
        return status < 300

    async def finish(self, lease: queue.Lease, result: JobResult) -> bool:
        path = f"/jobs/{lease.job.request_id}/result"
        status, content = await self._call("POST", path, result)
        if status < 300 or status == 409:
            return status < 300
        # The coordinator cannot take this result (too large for its body limit, say): its failure instead.
        log.error("request %s: the coordinator refused the result (%d): %s", lease.job.request_id, status,
                  _message(content))  # fmt: skip
        failed = JobResult(
            request_id=result.request_id, status="failed", model=result.model, worker_id=result.worker_id,
            error=ErrorInfo(code="result_refused", message=f"the coordinator refused the worker's result ({status})"),
            timings=result.timings,
        )  # fmt: skip
        status, _ = await self._call("POST", path, failed)
        return status < 300

    async def add_model(self, lease: queue.Lease) -> bool:
        status, content = await self._call("POST", f"/jobs/{lease.job.request_id}/pulled")
        if status == 409:  # not this worker's pull any more, or its registration cannot take the model
            return False
        if status >= 300:
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        return True

    async def set_group(self, group: Group) -> bool:
        status, content = await self._call("POST", "/group", group)
        if status == 410:  # no longer registered
            return False
        if status >= 300:
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        return True

    async def fail_over(self, lease: queue.Lease) -> bool:
        status, content = await self._call("POST", f"/jobs/{lease.job.request_id}/fail-over")
        if status == 409:
            return True  # not this worker's any more: nothing to store
        if status != 200:
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {_message(content)}")
        return _parse(Moved, content).jobs > 0

    async def hand_on(self, *, held: bool) -> int:
        return _parse(Moved, await self._expect("POST", "/hand-on", HandOn(held=held))).jobs

    async def reclaim_orphans(self, held: set[str], suspects: set[str]) -> tuple[int, set[str]]:
        body = Orphans(held=sorted(held), suspects=sorted(suspects))
        checked = _parse(OrphanCheck, await self._expect("POST", "/orphans", body))
        return checked.jobs, set(checked.suspects)

    async def run_listeners(
        self, ended: EndedJobs, telemetry: WorkerTelemetry, interval_s: float, stop: asyncio.Event
    ) -> None:
        # Nothing to run: each heartbeat's answer names the running jobs ended elsewhere, and the
        # coordinator adds the figures of every result it stores to the pool's history itself.
        await stop.wait()

    def heartbeat_sender(self, *, swarm_epoch: bool) -> _CoordinatorHeartbeat:  # the answer always carries the epoch
        return _CoordinatorHeartbeat(self._base + "/heartbeat", self._headers, self.worker_id)

    async def leave(self) -> bool:
        return _parse(Left, await self._expect("POST", "/leave")).left

    async def close(self) -> None:
        await self._http.close()


class _CoordinatorHeartbeat:
    """Beats through aiohttp, as the rest of the worker does, on an event loop of the heartbeat thread's
    own (that thread is not on the worker's loop, so a busy loop cannot hold a beat up)."""

    def __init__(self, url: str, headers: dict[str, str], worker_id: str) -> None:
        self._url = url
        self._headers = headers
        self._worker_id = worker_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None

    def send(self, heartbeat: Heartbeat, running: list[str]) -> BeatAnswer:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        body = WorkerBeat(heartbeat=heartbeat, running=running).model_dump_json()
        return self._loop.run_until_complete(self._send(body))

    async def _send(self, body: str) -> BeatAnswer:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=HEARTBEAT_TIMEOUT_S)
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=timeout)
        try:
            async with self._session.post(
                self._url, data=body, headers={"content-type": "application/json"}
            ) as response:
                status, content = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CoordinatorUnreachable(f"cannot reach the coordinator: {e!r}") from None
        if status == 401:
            # The worker's secret is gone: an admin removed it. Nothing it does will be accepted: stop.
            log.error("worker %s: the coordinator no longer accepts its secret (removed?); stopping", self._worker_id)
            return BeatAnswer(drain=True)
        if status != 200:
            text = content[:300].decode(errors="replace")
            raise CoordinatorUnreachable(f"the coordinator answered {status}: {text}")
        return _parse(BeatAnswer, content)

    def close(self) -> None:
        if self._loop is None:
            return
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
        self._loop.close()
