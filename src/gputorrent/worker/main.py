"""The worker's life: load the model, register, then heartbeat and consume until told to stop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import aiohttp

from gputorrent import __version__, logs, queue, redis_client, replication
from gputorrent.config import WorkerSettings
from gputorrent.errors import BackendError, BackendUnavailable, DeadlineExceeded, ModelUnavailable, WorkerGone
from gputorrent.protocol import (
    MAX_MODELS,
    MAX_TOKENS_PER_S,
    ErrorInfo,
    Group,
    Heartbeat,
    InferenceOptions,
    Job,
    JobResult,
    Registered,
    WorkerCondition,
    WorkerRegistration,
)
from gputorrent.redis_client import REDIS_FAILURES
from gputorrent.retry import Backoff
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends import Backend, make_backend, puller
from gputorrent.worker.backends.llamacpp import LlamaCppBackend
from gputorrent.worker.backends.ollama import same_model
from gputorrent.worker.backends.split import SplitBackend
from gputorrent.worker.coordinator_link import CoordinatorLink
from gputorrent.worker.ended import EndedJobs
from gputorrent.worker.executor import execute
from gputorrent.worker.hardware import detect_hardware
from gputorrent.worker.heartbeat import HeartbeatThread
from gputorrent.worker.link import PoolLink, RedisLink
from gputorrent.worker.model_swarm import FetchStopped, ModelSwarm
from gputorrent.worker.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)

ABANDON_TIMEOUT_S = 5.0  # how long a drain waits for stopped jobs before cancelling their tasks
POP_TIMEOUT_S = 1.0  # how long a take blocks on the doorbells while the consumer has work now and then
# A consumer that has taken nothing for IDLE_AFTER_S blocks IDLE_POP_TIMEOUT_S at a time. Each
# block's wake-up, far more than the look after it, is what an idle worker costs Redis, and most of
# a large pool is idle (docs/scaling.md). A stop, or a backend found failing, ends the long block
# at once where the link allows (`Worker._take`).
IDLE_AFTER_S = 10.0
IDLE_POP_TIMEOUT_S = 5.0  # within the longest long poll a coordinator grants (coordinator_link.LONGEST_TAKE_S)
REDIS_CONNECT_TIMEOUT_S = 2.0  # also how long a Sentinel that does not answer holds up finding the primary
# A silent connection (a cut link, a primary cut off) fails after this instead of blocking: it bounds
# how soon a worker turns to the new primary after a failover. Above POP_TIMEOUT_S, which a BLMOVE
# adds to it (a WAIT's own bound is added where it is sent: replication.py).
REDIS_REPLY_TIMEOUT_S = POP_TIMEOUT_S + 2.0
HEALTH_RETRY_S = 5.0  # how often an unhealthy worker probes its backend again
SPEED_WEIGHT = 0.2  # how much one job moves the measured speed (an exponentially weighted average)


class Worker:
    """One registered worker: `slots` consumer loops on the event loop, a heartbeat thread, a
    listener for jobs ended elsewhere, and a health probe of its backend."""

    def __init__(
        self,
        link: PoolLink,
        backend: Backend,
        registered: Registered,
        settings: WorkerSettings,
        model: str,
        also_serves: Sequence[str] = (),
        swarm: ModelSwarm | None = None,
    ) -> None:
        self.link = link
        self.backend = backend
        self.worker_id = registered.worker_id
        self.heartbeat_interval_s = registered.heartbeat_interval_s
        self.heartbeat_timeout_s = registered.heartbeat_timeout_s
        self.settings = settings
        self.model = model
        # What it serves: `model`, the others it registered with, and those pull jobs fetched since it started.
        self.models = [model, *also_serves]
        self.jobs_in_flight = 0
        self.jobs_done = 0
        self.tokens_per_s: float | None = None  # generation speed, weighted towards recent jobs
        self.condition: WorkerCondition = "alive"
        self.condition_reason: str | None = None
        self.ended = EndedJobs()
        self._probe_soon = asyncio.Event()  # set: the health probe runs without waiting for its interval
        self._serving = asyncio.Event()  # clear while unhealthy: the consumers take no job
        self._serving.set()
        self._interrupt_takes = asyncio.Event()  # set while stopping or unhealthy: long blocks end now
        self._takes_interrupted = False  # one was: it may have moved a job into the processing list
        self.idle_after_s, self.idle_pop_timeout_s = IDLE_AFTER_S, IDLE_POP_TIMEOUT_S
        # The request ids of the jobs the consumers hold now, counted: two consumers can hold one job (a
        # shared job handed back to its queue while this worker stalled, then taken again here).
        self._held: collections.Counter[str] = collections.Counter()
        self._abandoning = False  # set once a drain stops its jobs to hand them on
        # Another process registered this worker's id since: the id's lists and registration are that
        # process's now, so this one hands nothing on, reclaims nothing and does not leave.
        self._replaced = False
        self._last_success = time.monotonic()
        self._heartbeat: HeartbeatThread | None = None
        self.telemetry = WorkerTelemetry(self.worker_id)
        self.swarm = swarm  # where it seeds its model files, and fetches the models it pulls
        self._swarm_epoch = -1
        self._following: asyncio.Task[None] | None = None

    def heartbeat(self) -> Heartbeat:
        """What the heartbeat thread writes: load and condition."""
        return Heartbeat(
            at=time.time(), jobs_in_flight=self.jobs_in_flight, condition=self.condition, reason=self.condition_reason,
            telemetry=self.telemetry.sample(), tokens_per_s=self.tokens_per_s,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Consume until `stop` is set, then drain (see `_drain`) and leave the pool.

        In burst mode it returns once the queue is empty instead.
        """
        loop = asyncio.get_running_loop()

        def drain_asked(replaced: bool) -> None:  # on the heartbeat thread: see `HeartbeatThread`
            loop.call_soon_threadsafe(self._stop, stop, replaced)

        def ended_elsewhere(request_ids: list[str]) -> None:  # on the heartbeat thread
            loop.call_soon_threadsafe(self.ended.end, request_ids)

        def swarm_epoch(epoch: int) -> None:  # on the heartbeat thread
            if epoch != self._swarm_epoch:
                loop.call_soon_threadsafe(self._follow_swarm, epoch)

        self._heartbeat = HeartbeatThread(
            self.link.heartbeat_sender(swarm_epoch=self.swarm is not None), self.worker_id,
            self.heartbeat_interval_s, self.heartbeat, self.ended.running, on_drain=drain_asked,
            on_ended=ended_elsewhere, on_swarm_epoch=swarm_epoch if self.swarm is not None else None,
        )  # fmt: skip
        self._heartbeat.start()
        if isinstance(self.backend, SplitBackend):  # a broken group: unhealthy at once, not at the next probe
            self.backend.on_broken = self._become_unhealthy
            self.backend.on_formed = self._show_group
        try:
            if recovered := await self._recover(stop):
                log.info(
                    "worker %s: %d unfinished jobs of its previous run are queued again", self.worker_id, recovered
                )
            helpers_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(
                    self.link.run_listeners(self.ended, self.telemetry, self.heartbeat_interval_s, helpers_stop)
                )
                if not burst:
                    tasks.create_task(self._watch_health(helpers_stop))
                    tasks.create_task(self._reclaim_orphans(helpers_stop))
                consumers = [tasks.create_task(self._consume(stop, burst)) for _ in range(self.settings.slots)]
                await self._until_stopped(stop, consumers)
                helpers_stop.set()
        finally:
            await asyncio.to_thread(self._heartbeat.stop)
            if self._following is not None:
                self._following.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._following
            await self._leave()

    def _stop(self, stop: asyncio.Event, replaced: bool) -> None:
        """Drain and stop (a beat's answer said so); `replaced`: as another process's id, see `_replaced`."""
        self._replaced = self._replaced or replaced
        stop.set()

    async def _recover(self, stop: asyncio.Event) -> int:
        """`link.recover()`, tried again while Redis cannot be reached (a worker started during a
        failover or a cut link waits for it, as its consumers would, rather than exit)."""
        backoff = Backoff()
        while True:
            try:
                return await self.link.recover()
            except REDIS_FAILURES as e:
                if stop.is_set():
                    return 0
                log.warning(
                    "worker %s cannot reach Redis to recover its previous run's jobs (%s); retrying in %.1f s",
                    self.worker_id, e, backoff.delay_s,
                )  # fmt: skip
                await backoff.wait()

    async def _until_stopped(self, stop: asyncio.Event, consumers: list[asyncio.Task[None]]) -> None:
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, *consumers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if stop.is_set():
            await self._drain(consumers)
        else:  # burst mode: each consumer ends when it finds the queue empty
            await asyncio.wait(consumers)

    async def _drain(self, consumers: list[asyncio.Task[None]]) -> None:
        """Take no new job, hand the queue to others, give the jobs in flight `drain_timeout_s` to
        finish, then stop those still running at their next token, leave their leases unfinished and
        hand them on: the next worker continues each stream after exactly the tokens sent."""
        # A replaced worker's jobs are the other process's to run again (its orphan check finds them):
        # each token more this one streams would be written beside that one's.
        grace_s = 0.0 if self._replaced else self.settings.drain_timeout_s
        log.info(
            "worker %s draining: %d jobs in flight get %g s to finish", self.worker_id, self.jobs_in_flight, grace_s
        )
        self._set_condition("draining", None)
        self._interrupt_takes.set()
        await self._hand_on_queue()
        _, running = await asyncio.wait(consumers, timeout=grace_s)
        if running:
            log.warning("worker %s: %d jobs still running after %g s; handing them on", self.worker_id,
                        self.jobs_in_flight, grace_s)  # fmt: skip
            self._abandoning = True  # stopped jobs keep their leases: no result is stored for them
            self.ended.end_all_here()
            _, stuck = await asyncio.wait(running, timeout=ABANDON_TIMEOUT_S)
            for consumer in stuck:  # a backend call that cannot be stopped between tokens
                consumer.cancel()
            await asyncio.wait(running)
            # Only now, with nothing more written to their streams, can another worker read where they stopped.
            await self._hand_on(held=True)
        await self._hand_on_queue()  # routed here before the coordinators saw the drain
        if self._takes_interrupted:  # a take that ran in Redis as it was interrupted left its job to no one
            await self._hand_on(held=True)

    async def _hand_on_queue(self) -> int:
        """Give every band of this worker's own queue to other live workers (the shared queues need no
        hand-on: other workers take from them anyway)."""
        return await self._hand_on(held=False)

    async def _hand_on(self, *, held: bool) -> int:
        """Give this worker's queue (with `held`, the jobs it holds) to other live workers; 0 when that
        fails (the reaper moves them once this worker is gone), or when the id is another process's now."""
        if self._replaced:
            return 0
        try:
            handed = await self.link.hand_on(held=held)
        except REDIS_FAILURES as e:
            log.warning("worker %s could not hand on its jobs (%s); the reaper will", self.worker_id, e)
            return 0
        if handed:
            log.info("worker %s handed %d jobs to other workers", self.worker_id, handed)
        return handed

    async def _leave(self) -> None:
        if self._replaced:
            log.info("worker %s stopped after %d jobs; its id is another process's now", self.worker_id, self.jobs_done)
            return
        try:
            left = await self.link.leave()
        except REDIS_FAILURES as e:
            log.warning("worker %s could not mark itself gone (%s); its heartbeat will expire", self.worker_id, e)
            return
        how = "left the pool" if left else "stopped; jobs no other worker could take wait in its lists"
        log.info("worker %s %s after %d jobs", self.worker_id, how, self.jobs_done)

    async def _show_group(self, group: Group) -> None:
        """The split model's group re-formed on other hosts: the registration (and `/workers`) says so,
        and the health probe runs now rather than at its next interval."""
        self._probe_soon.set()
        try:
            await self.link.set_group(group)
        except REDIS_FAILURES as e:
            log.warning("worker %s: its group re-formed, but its registration still shows the old one (%s)",
                        self.worker_id, e)  # fmt: skip

    def _follow_swarm(self, epoch: int) -> None:
        """The swarm's members changed: let them in (one reading at a time; a later epoch reads again)."""
        if self.swarm is None or (self._following is not None and not self._following.done()):
            return
        self._swarm_epoch = epoch

        async def follow(swarm: ModelSwarm) -> None:
            if not await swarm.follow():
                self._swarm_epoch = -1  # read them again at the next beat

        self._following = asyncio.create_task(follow(self.swarm), name="swarm members")

    def _set_condition(self, condition: WorkerCondition, reason: str | None) -> None:
        self.condition, self.condition_reason = condition, reason
        if self._heartbeat is not None:
            self._heartbeat.beat_now()

    async def _watch_health(self, stop: asyncio.Event) -> None:
        """Probe the backend with a one-token generation whenever it has been idle for a health
        interval: a backend that lists models but cannot generate makes the worker unhealthy."""
        while not stop.is_set():
            unhealthy = self.condition == "unhealthy"
            wait_s = (
                min(HEALTH_RETRY_S, self.settings.health_interval_s) if unhealthy else self.settings.health_interval_s
            )
            await _first_of(stop, self._probe_soon, timeout_s=wait_s)
            self._probe_soon.clear()
            if stop.is_set() or self.condition == "draining":
                return
            unhealthy = self.condition == "unhealthy"  # it may have turned so while this waited
            recently_served = time.monotonic() - self._last_success < self.settings.health_interval_s
            if self.jobs_in_flight or (recently_served and not unhealthy):
                continue
            failure = await self._probe()
            if failure is None:
                self._last_success = time.monotonic()
                if unhealthy:
                    log.info("worker %s: its backend generates again; taking jobs", self.worker_id)
                    self._set_condition("alive", None)
                    self._interrupt_takes.clear()
                    self._serving.set()
            else:
                await self._become_unhealthy(failure)

    async def _probe(self) -> str | None:
        """A one-token generation; None when it worked, else why not."""
        probe = Job(
            request_id=f"health-{uuid.uuid4().hex}", worker_id=self.worker_id, model=self.model, prompt="Hello",
            options=InferenceOptions(max_tokens=1, temperature=0.0), enqueued_at=time.time(),
            deadline=time.time() + self.settings.health_timeout_s,
        )  # fmt: skip
        result = await execute(self.backend, probe)
        # A backend that answers with a refusal (a model that only embeds, say) is up; only no answer,
        # a server error or a hang is a failure.
        if result.error is None or result.error.code not in (BackendUnavailable.code, DeadlineExceeded.code):
            return None
        return result.error.message

    async def _become_unhealthy(self, reason: str) -> None:
        if self.condition == "draining":  # it takes no job anyway
            return
        if self.condition != "unhealthy":
            log.warning("worker %s is unhealthy: %s; it takes no job until its backend generates again",
                        self.worker_id, reason)  # fmt: skip
        self._set_condition("unhealthy", reason)
        self._serving.clear()
        self._interrupt_takes.set()
        await self._hand_on_queue()

    async def _reclaim_orphans(self, stop: asyncio.Event) -> None:
        """Take back the jobs Redis moved into this worker's processing list by a pop whose reply never
        arrived (the connection dropped just then): nobody would run them, and this worker's heartbeat
        keeps the reaper away. An entry no consumer holds on two looks `link.orphan_check_s` apart is
        one (longer than any take's reply can take, or a job a consumer is about to run looks lost);
        it goes back to the front of this worker's queue (an unhealthy worker's next failed probe hands
        that on)."""
        suspects: set[str] = set()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.link.orphan_check_s)
            if stop.is_set() or self._replaced:  # what the list holds is another process's now
                return
            try:
                held = set(self._held)
                _, suspects = await self.link.reclaim_orphans(held, suspects)
            except REDIS_FAILURES as e:
                log.warning("worker %s cannot check its held jobs (%s)", self.worker_id, e)

    async def _consume(self, stop: asyncio.Event, burst: bool) -> None:
        backoff = Backoff()
        queued_after_take = True  # whether the last take left jobs queued: then look before waiting
        worked_at = time.monotonic()  # when this consumer last had a job (or started)
        while not stop.is_set():
            if not self._serving.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._serving.wait(), POP_TIMEOUT_S)
                continue
            try:
                if burst:
                    timeout_s = 0.05
                elif time.monotonic() - worked_at < self.idle_after_s:
                    timeout_s = POP_TIMEOUT_S
                else:
                    timeout_s = self.idle_pop_timeout_s
                lease = await self._take(timeout_s, wait_first=not queued_after_take)
            except WorkerGone as e:  # removed from the pool: no take will ever succeed again
                log.error("worker %s: %s; stopping", self.worker_id, e)
                stop.set()
                return
            except REDIS_FAILURES as e:
                log.warning("worker %s cannot reach Redis (%s); retrying in %.1f s", self.worker_id, e, backoff.delay_s)
                await backoff.wait()
                continue
            backoff.reset()
            queued_after_take = lease is not None and lease.more_queued
            if lease is None:
                if burst:
                    return
                continue
            self.jobs_in_flight += 1
            self._held[lease.job.request_id] += 1
            try:
                await self._handle(lease)
            finally:
                self._held[lease.job.request_id] -= 1
                if not self._held[lease.job.request_id]:
                    del self._held[lease.job.request_id]
                self.jobs_in_flight -= 1
                logs.request_id.set(None)
                worked_at = time.monotonic()

    async def _take(self, timeout_s: float, *, wait_first: bool) -> queue.Lease | None:
        """`link.take`. A block longer than `POP_TIMEOUT_S` (an idle consumer's) ends at once, with no
        job, when the worker stops or its backend fails (`_interrupt_takes`), rather than be waited out.
        An interrupted take may already have moved a job into the processing list in Redis, for no one:
        a stopping worker's drain hands it on; an unhealthy one's orphan check queues it again
        (`_reclaim_orphans`), and its next failed probe hands its queue on."""
        if timeout_s <= POP_TIMEOUT_S or not self.link.takes_cancel_at_once:
            return await self.link.take(timeout_s, self.models, wait_first=wait_first)
        taking = asyncio.ensure_future(self.link.take(timeout_s, self.models, wait_first=wait_first))
        interrupted = asyncio.ensure_future(self._interrupt_takes.wait())
        cut_off = False
        try:
            await asyncio.wait([taking, interrupted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
            if not taking.done():
                cut_off = self._takes_interrupted = True
                taking.cancel()
                await asyncio.wait([taking])
                if not taking.cancelled():
                    taking.exception()  # retrieved: whatever it ended with, it was given up
        return None if cut_off else taking.result()

    async def _handle(self, lease: queue.Lease) -> None:
        job = lease.job
        logs.request_id.set(job.request_id)  # every line logged for this job carries its id
        log.info("request %s started model=%s", job.request_id, job.model)
        if job.stream and lease.streamed_before:
            job = await self._continuing(job)
        writer = StreamWriter(functools.partial(self.link.append, lease)) if job.stream else None
        # Watched until its result is stored: its beats name it (`EndedJobs.running`) until then, which
        # keeps this worker's presence in the job's cell when it took the job from abroad.
        ended = self.ended.watch(job.request_id)
        try:
            await self._run_and_store(lease, job, writer, ended)
        finally:
            self.ended.unwatch(job.request_id)

    async def _run_and_store(
        self, lease: queue.Lease, job: Job, writer: StreamWriter | None, ended: asyncio.Event
    ) -> None:
        result = await execute(
            self.backend, job, writer, ended, taken_at=lease.taken_at,
            replay_max_tokens=self.settings.resume_replay_max_tokens,
        )  # fmt: skip
        stopped = ended.is_set()  # while it ran: an end heard once it is done changes nothing
        if writer is not None:
            try:
                await writer.close()
            except REDIS_FAILURES as e:  # the stream loses text; the result below still carries all of it
                log.warning("request %s: stream write failed (%s)", job.request_id, e)
        if self._abandoning and stopped:
            log.info("request %s: stopped by the drain; left for another worker to finish", job.request_id)
            return
        if result.error is not None and result.error.code == BackendUnavailable.code:
            await self._become_unhealthy(result.error.message)
            if await self._fail_over(lease):
                return
        elif result.status == "completed":
            self._last_success = time.monotonic()
        if job.kind == "pull" and result.status == "completed":
            result = await self._serve_pulled(lease, result)
        await self._store(lease, result)

    async def _serve_pulled(self, lease: queue.Lease, result: JobResult) -> JobResult:
        """Add the model a pull job fetched to this worker's registration (routing and the model
        listings see it) and to the queues it takes from, before the pull's result tells the client
        it succeeded; the result as failed when the registration cannot take it."""
        job = lease.job
        backoff = Backoff()
        while True:
            try:
                listed = await self.link.add_model(lease)
                break
            except REDIS_FAILURES as e:
                log.warning("request %s: model %s pulled, not listed yet (%s); retrying", job.request_id, job.model, e)
                await backoff.wait()
        if listed:
            if job.model not in self.models:
                self.models.append(job.model)
            log.info("worker %s serves %s now", self.worker_id, job.model)
            return result
        message = (
            f"worker {self.worker_id} pulled {job.model!r} but cannot list it: it lists {MAX_MODELS} models "
            "already, or the pull is no longer its own"
        )
        error = ErrorInfo(code=ModelUnavailable.code, message=message)
        return result.model_copy(update={"status": "failed", "error": error})

    async def _continuing(self, job: Job) -> Job:
        """The streamed job, continuing after the text an earlier attempt already sent (if any).

        Retried through a Redis outage: starting afresh would repeat that text to the client.
        """
        backoff = Backoff()
        while True:
            try:
                sent, tokens = await self.link.sent_so_far(job.request_id)
                break
            except REDIS_FAILURES as e:
                log.warning("request %s: cannot read its stream yet (%s); retrying", job.request_id, e)
                await backoff.wait()
        if not sent:
            return job
        log.info("request %s: resuming its stream after %d tokens of an earlier attempt", job.request_id, tokens)
        return job.model_copy(update={"continuation": sent, "continuation_tokens": tokens})

    async def _fail_over(self, lease: queue.Lease) -> bool:
        """Hand a job this worker's backend could not run to another worker (counting an attempt);
        False when it had its last attempt or no other live worker serves its model."""
        try:
            return await self.link.fail_over(lease)
        except REDIS_FAILURES as e:
            log.warning("request %s: could not hand it on (%s); storing the failure", lease.job.request_id, e)
            return False

    async def _store(self, lease: queue.Lease, result: JobResult) -> None:
        """Write the result while the lease holds. It is the job's only copy now: retry through a
        Redis outage, and never let a cancellation interrupt the write half-way."""
        job = lease.job
        # Retried as often as the heartbeat: a result held through an outage lands soon after Redis is back.
        backoff = Backoff(max_s=self.heartbeat_interval_s)
        while True:
            try:
                held = await asyncio.shield(self.link.finish(lease, result))
                break
            except REDIS_FAILURES as e:
                log.warning("request %s: result not stored yet (%s); retrying", job.request_id, e)
                await backoff.wait()
        if not held:
            log.warning(
                "request %s: result discarded: the job was ended or handed on meanwhile (cancelled, timed out, "
                "or this worker was judged dead)",
                job.request_id,
            )
            return
        log.info(
            "request %s %s in %.0f ms (%d tokens)",
            job.request_id,
            result.status,
            result.timings.inference_ms,
            result.usage.completion_tokens,
        )
        self.telemetry.record(job, result)
        self.jobs_done += 1
        self._note_speed(result)

    def _note_speed(self, result: JobResult) -> None:
        """Fold a completed generation's tokens per second into the speed the heartbeat reports (routing
        weighs workers by it)."""
        tokens, inference_ms = result.usage.completion_tokens, result.timings.inference_ms
        if result.status != "completed" or tokens < 2 or inference_ms <= 0:
            return  # one token measures the prompt, not the generation
        # A job timed to a few microseconds (a test backend) would measure more than a heartbeat may carry.
        measured = min(tokens / (inference_ms / 1000), MAX_TOKENS_PER_S)
        previous = self.tokens_per_s
        self.tokens_per_s = measured if previous is None else previous + SPEED_WEIGHT * (measured - previous)


async def _first_of(*events: asyncio.Event, timeout_s: float) -> None:
    """Until one of `events` is set, or `timeout_s` passes."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def default_worker_id() -> str:
    """Host name plus a random suffix, so two workers on one machine never share a queue."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


async def served_models(backend: Backend, model: str) -> list[str]:
    """The models the worker registers with: `model` first, then, where the backend can pull, every
    other model it has. Such a backend (Ollama) loads any model it has when a request names it, so a
    restarted worker still serves the models it pulled before."""
    if puller(backend) is None:
        return [model]
    try:
        listed = await backend.list_models()
    except BackendError as e:  # it answered the load just now: serve `model` and say why no more
        log.warning("backend %s serves %s; listing its other models failed: %s", backend.name, model, e)
        return [model]
    models = [model, *(name for name in dict.fromkeys(listed) if not same_model(model, name))]
    if len(models) > MAX_MODELS:
        log.warning("backend %s has %d models; the worker serves the first %d", backend.name, len(models), MAX_MODELS)
    return models[:MAX_MODELS]


async def register(
    settings: WorkerSettings, worker_id: str, models: list[str], backend: Backend, swarm: ModelSwarm | None = None
) -> Registered:
    """`POST /register` to the coordinator, retrying with backoff until `register_timeout_s`. With a
    swarm it publishes the files it seeds (the catalogue refuses a file other than its own under a name)."""
    body = WorkerRegistration(
        worker_id=worker_id,
        models=models,
        backend=backend.name,
        slots=settings.slots,
        hardware=detect_hardware(),
        version=__version__,
        can_pull=puller(backend) is not None,
        swarm=swarm.peer if swarm is not None else None,
        files=swarm.files if swarm is not None else {},
        group=backend.view if isinstance(backend, SplitBackend) else None,
    )
    url = settings.coordinator_url.rstrip("/") + "/register"
    headers = {"content-type": "application/json"}
    if settings.join_token is not None:
        headers["authorization"] = f"Bearer {settings.join_token.get_secret_value()}"
    deadline = time.monotonic() + settings.register_timeout_s
    backoff = Backoff(first_s=0.2, max_s=3.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            try:
                async with http.post(url, data=body.model_dump_json(), headers=headers) as resp:
                    if resp.status == 200:
                        return Registered.model_validate_json(await resp.read())
                    if resp.status == 409 and (refused := _catalogue_refusal(await resp.read())):
                        raise RuntimeError(f"the coordinator refused registration: {refused}")
                    # 409: an earlier run of this worker id still looks alive; its heartbeat expires soon.
                    if resp.status < 500 and resp.status not in (409, 429):  # retrying cannot help
                        raise RuntimeError(f"the coordinator refused registration ({resp.status}): {await resp.text()}")
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=resp.reason or ""
                    )
            except (aiohttp.ClientError, TimeoutError) as e:
                if time.monotonic() + backoff.delay_s > deadline:
                    raise RuntimeError(f"cannot reach the coordinator at {settings.coordinator_url}: {e}") from e
                log.info("coordinator not reachable yet (%s); retrying", e)
                await backoff.wait()


async def run_worker(settings: WorkerSettings, stop: asyncio.Event, *, burst: bool = False) -> None:
    """Load the model, register, then serve jobs until `stop` is set."""
    worker_id = settings.worker_id or default_worker_id()
    backend = make_backend(settings, worker_id)
    swarm = backend.swarm if isinstance(backend, LlamaCppBackend) else None
    try:
        try:
            async with _stopping_fetches(stop, swarm):
                model = await backend.load(settings.model)
        except FetchStopped:
            log.info("stopped while fetching the model; never joined the pool")
            return
        if stop.is_set():  # told to stop while the model loaded: never join the pool
            return
        log.info("backend %s serves %s", backend.name, model)
        models = await served_models(backend, model)
        if len(models) > 1:
            log.info("backend %s also serves %s", backend.name, ", ".join(models[1:]))
        registered = await register(settings, worker_id, models, backend, swarm)
        log.info("worker %s registered with %s (link: %s)", worker_id, settings.coordinator_url, settings.link)
        link = open_link(settings, registered)
        try:
            await Worker(link, backend, registered, settings, model, models[1:], swarm).run(stop, burst=burst)
        finally:
            await link.close()
    finally:
        await backend.close()


def _catalogue_refusal(body: bytes) -> str | None:
    """The message of a 409 that refuses one of the worker's files (the catalogue has another file under
    its model's name): retrying cannot help, unlike a 409 for a live worker with this id."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(error, dict) and str(error.get("field", "")).startswith("files."):
        return str(error.get("message"))
    return None


@contextlib.asynccontextmanager
async def _stopping_fetches(stop: asyncio.Event, swarm: ModelSwarm | None) -> AsyncIterator[None]:
    """While inside, `stop` stops the swarm's fetches (a worker told to stop while it fetches its model)."""
    if swarm is None:
        yield
        return

    async def watch() -> None:
        await stop.wait()
        swarm.stop()

    watching = asyncio.create_task(watch())
    try:
        yield
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


def open_link(settings: WorkerSettings, registered: Registered) -> PoolLink:
    """The worker's link to the pool: Redis itself, or the coordinator's `/worker` routes."""
    if settings.link == "coordinator":
        return CoordinatorLink(settings.coordinator_url, registered.worker_id, registered.worker_secret)
    redis = redis_client.async_client(
        settings.redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_REPLY_TIMEOUT_S
    )
    replication.configure(redis, settings.wait_replicas, settings.wait_timeout_ms)
    return RedisLink(
        redis, settings.redis_url, registered.worker_id, heartbeat_ttl_s=registered.heartbeat_timeout_s,
        max_attempts=settings.max_attempts, result_ttl_s=settings.result_ttl_s,
        registered_at=registered.registered_at,
    )  # fmt: skip
