"""Pulling a model onto the workers whose backend can (`POST /api/pull`). No HTTP here.

A pull is work for workers: one job of kind `pull` for each live worker that can pull (it registered
`can_pull`: its backend is a `Puller`: Ollama's pulls from its registry, llama.cpp's fetches the
model's file from the pool's swarm, so only a model in the catalogue) and does not serve it yet, queued on
that worker's own queue. So it is findable in Redis from admission to result, leased, timed out
and reaped as any job is; unlike other jobs it is its worker's alone: when that worker dies it waits
for it to come back (a restart runs it again, and Ollama resumes the download) until its deadline,
`GPUTORRENT_PULL_TIMEOUT_S`.

The worker writes each progress line of its backend into the job's stream as a line of JSON
(`PullProgress`), and adds the model to its registration before it stores the result, so the model
is listed and routed to by the time the client hears of success. `follow` reads the streams of
every worker a request pulls onto at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
from pydantic import ValidationError

from gputorrent import keys, queue, streams
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator import relay
from gputorrent.coordinator.dispatch import new_request_id
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.coordinator.security import Caller
from gputorrent.errors import JobFailed, NoWorkersAvailable, RedisUnavailable, ResultTimeout
from gputorrent.protocol import ErrorInfo, Job, JobResult, PullProgress, WorkerState
from gputorrent.redis_client import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)

Resolve = Callable[[str, list[str]], str | None]
"""The served model a requested name means among some models, if any (Ollama's `:latest` rule)."""


@dataclass(frozen=True)
class Plan:
    """Where a pull goes: `targets`, the live workers that can pull and lack the model (by id); and
    whether a live worker serves the model already (`served`)."""

    targets: list[str]
    served: bool


SWARM_BACKENDS = frozenset({"llamacpp"})  # backends that pull from the pool's swarm, not from a registry


def plan(name: str, workers: Sequence[WorkerState], resolve: Resolve, *, in_catalogue: bool = False) -> Plan:
    """Which live workers a pull of `name` goes to: those that can pull it (from the swarm: only a model
    `in_catalogue`) and lack it.

    >>> from gputorrent.protocol import Hardware
    >>> def worker(worker_id, models, can_pull):
    ...     return WorkerState(worker_id=worker_id, models=models, backend="b", slots=1, hardware=Hardware(),
    ...                        state="alive", jobs_in_flight=0, queue_length=0, last_heartbeat_at=None,
    ...                        registered_at=0.0, can_pull=can_pull)
    >>> same = lambda name, models: name if name in models else None
    >>> plan("m", [worker("a", ["x"], True), worker("b", ["m"], True), worker("c", ["x"], False)], same)
    Plan(targets=['a'], served=True)
    """
    live = [w for w in workers if w.state == "alive"]
    can_pull = [w for w in live if w.can_pull and (in_catalogue or w.backend not in SWARM_BACKENDS)]
    targets = sorted(w.worker_id for w in can_pull if resolve(name, w.models) is None)
    return Plan(targets=targets, served=any(resolve(name, w.models) is not None for w in live))


def cannot_pull(name: str, workers: Sequence[WorkerState]) -> NoWorkersAvailable:
    """The error for a model no live worker serves when no live worker can pull it either."""
    backends = sorted({w.backend for w in workers if w.state == "alive"})
    if not backends:
        return NoWorkersAvailable("no live worker is registered; start one with `gputorrent worker`")
    return NoWorkersAvailable(
        f"no live worker can pull {name!r}: their backends ({', '.join(backends)}) cannot fetch it (the ollama "
        "backend pulls from its registry; the llamacpp backend only models in the pool's catalogue, "
        f"`GET /swarm/catalogue`); start a worker with --backend ollama, or one with --model {name}"
    )


@dataclass(frozen=True)
class Finished:
    """How one worker's pull ended: `error` None when the worker serves the model now."""

    worker_id: str
    request_id: str  # its pull job; empty when none was queued
    error: ErrorInfo | None


@dataclass(frozen=True)
class Progress:
    """A progress line of one worker's pull."""

    worker_id: str
    line: PullProgress


@dataclass
class Started:
    """The pull jobs of one request, by request id with their workers, and the workers whose pull
    could not be queued (they left the pool meanwhile)."""

    jobs: dict[str, str] = field(default_factory=dict)
    failed: list[Finished] = field(default_factory=list)


async def start(
    redis: RedisClient,
    name: str,
    targets: Sequence[str],
    settings: CoordinatorSettings,
    caller: Caller,
    *,
    stream: bool,
    insecure: bool,
) -> Started:
    """Queue one pull job of `name` for each worker of `targets`, owned by `caller` (see `queue.enqueue`).

    With `stream` the workers write their progress into the jobs' streams (see `follow`).
    """
    started = Started()
    for worker_id in targets:
        now = time.time()
        job = Job(
            request_id=new_request_id(keys.cell_of(worker_id)), worker_id=worker_id, model=name, kind="pull",
            enqueued_at=now, deadline=now + settings.pull_timeout_s, stream=stream, insecure=insecure,
        )  # fmt: skip
        try:
            await queue.enqueue(redis, job, settings.result_ttl_s, owner=caller.key_id, require_alive=True)
        except queue.WorkerGone:
            message = f"worker {worker_id} left the pool before its pull was queued"
            started.failed.append(Finished(worker_id, "", ErrorInfo(code="worker_lost", message=message)))
            continue
        started.jobs[job.request_id] = worker_id
        log.info("request %s queued: pull of %s onto worker %s", job.request_id, name, worker_id)
    return started


def wait_s(settings: CoordinatorSettings) -> float:
    """How long a client's request waits for its pulls: past their deadline by two reaper rounds,
    so the reaper's `timeout` result, not the wait's end, tells how an overdue pull ended."""
    return settings.pull_timeout_s + 2 * settings.heartbeat_interval_s


async def follow(
    redis: RedisClient,
    started: Started,
    timeout_s: float,
    ttl_s: int,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[Progress | Finished]:
    """The progress of every pull job of `started` as it comes, and how each ended.

    Raises:
        ResultTimeout: some job had no result within `timeout_s`.
        RedisUnavailable: Redis failed on the way.

    When the client goes away (`disconnected()` turns true, checked at least once a second, or the
    consumer stops iterating), the unfinished jobs are ended as cancelled: a queued pull never
    runs, a running one stops at its next progress line.
    """
    finished: set[str] = set()
    try:
        async for batch in streams.follow_many(redis, list(started.jobs), timeout_s):
            for request_id, (_, item) in batch:
                worker_id = started.jobs[request_id]
                if isinstance(item, JobResult):
                    finished.add(request_id)
                    yield Finished(worker_id, request_id, item.error if item.status == "failed" else None)
                else:
                    for line in progress_lines(item.text):
                        yield Progress(worker_id, line)
            if len(finished) < len(started.jobs) and await disconnected():
                return
        if len(finished) < len(started.jobs):
            raise ResultTimeout(f"the pull produced no result within {timeout_s:g} s")
    except REDIS_FAILURES as e:
        log.warning("pull: Redis failed while following it (%s)", e)
        raise RedisUnavailable("the coordinator lost Redis while following the pull; retry shortly") from e
    finally:
        unfinished = [request_id for request_id in started.jobs if request_id not in finished]
        # Shielded: the server cancels this task when the client goes (see relay.follow).
        with anyio.CancelScope(shield=True):
            for request_id in unfinished:
                try:
                    await queue.end(redis, request_id, relay.CLIENT_LEFT, ttl_s)
                except REDIS_FAILURES as e:
                    log.warning("request %s: could not record the cancellation (%s)", request_id, e)


async def wait(waiter: ResultWaiter, started: Started, timeout_s: float) -> list[Finished]:
    """How each pull job of `started` ended, once all have (a job without a result in `timeout_s`
    counts as failed with `result_timeout`; it goes on)."""

    async def one(request_id: str, worker_id: str) -> Finished:
        found = await waiter.wait(request_id, timeout_s, admitted=True)  # queued just now by `start`
        if isinstance(found, JobResult):
            return Finished(worker_id, request_id, found.error if found.status == "failed" else None)
        message = f"no result within {timeout_s:g} s; poll GET /result/{request_id} for it"
        return Finished(worker_id, request_id, ErrorInfo(code=ResultTimeout.code, message=message))

    return list(await asyncio.gather(*(one(request_id, worker_id) for request_id, worker_id in started.jobs.items())))


def progress_lines(text: str) -> list[PullProgress]:
    """The progress lines in a batch of a pull job's stream (lines of JSON); a line that is not one
    is skipped: a worker's word is not trusted to be well formed."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            lines.append(PullProgress.model_validate_json(raw))
        except ValidationError:
            log.debug("pull: skipping a progress line that is not one: %.200s", raw)
    return lines


def failure(name: str, finished: Sequence[Finished]) -> JobFailed | None:
    """One error naming every worker whose pull failed, with the status of the first failure's code;
    None when every pull succeeded."""
    failed = [(f, f.error) for f in finished if f.error is not None]
    if not failed:
        return None
    (first, error), *others = failed
    if not others:
        message = f"the pull of {name!r} failed on worker {first.worker_id}: {error.message}"
    else:
        each = "; ".join(f"{f.worker_id}: {e.message}" for f, e in failed)
        message = f"the pull of {name!r} failed on workers {', '.join(f.worker_id for f, _ in failed)}: {each}"
    return JobFailed(message, request_id=first.request_id, code=error.code)
