"""The worker's life: load the model, register, then heartbeat and consume until told to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent import __version__, keys, queue, registry
from gputorrent.config import WorkerSettings
from gputorrent.protocol import Registered, WorkerRegistration
from gputorrent.retry import Backoff
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends import Backend, make_backend
from gputorrent.worker.executor import execute
from gputorrent.worker.hardware import detect_hardware
from gputorrent.worker.heartbeat import HeartbeatThread

log = logging.getLogger(__name__)

POP_TIMEOUT_S = 1.0  # how long a BLMOVE blocks; also how fast a stop request is noticed


class Worker:
    """One registered worker: `slots` consumer loops on the event loop, and a heartbeat thread."""

    def __init__(self, redis: Redis, backend: Backend, registered: Registered, settings: WorkerSettings) -> None:
        self.redis = redis
        self.backend = backend
        self.worker_id = registered.worker_id
        self.heartbeat_interval_s = registered.heartbeat_interval_s
        self.heartbeat_timeout_s = registered.heartbeat_timeout_s
        self.settings = settings
        self.jobs_in_flight = 0
        self.jobs_done = 0

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Consume until `stop` is set (or, in burst mode, until the queue is empty), then leave."""
        heartbeat = HeartbeatThread(
            self.settings.redis_url,
            self.worker_id,
            self.heartbeat_interval_s,
            self.heartbeat_timeout_s,
            lambda: self.jobs_in_flight,
        )
        heartbeat.start()
        try:
            recovering = queue.recover(
                self.redis, self.worker_id, self.settings.max_attempts, self.settings.result_ttl_s
            )
            if recovered := await recovering:
                log.info(
                    "worker %s: %d unfinished jobs of its previous run are queued again", self.worker_id, recovered
                )
            async with asyncio.TaskGroup() as tasks:
                for _ in range(self.settings.slots):
                    tasks.create_task(self._consume(stop, burst))
        finally:
            await asyncio.to_thread(heartbeat.stop)
            try:
                await registry.mark_gone(self.redis, self.worker_id)
            except (RedisError, OSError) as e:
                log.warning("worker %s could not mark itself gone (%s); its heartbeat will expire", self.worker_id, e)
            log.info("worker %s stopped after %d jobs", self.worker_id, self.jobs_done)

    async def _consume(self, stop: asyncio.Event, burst: bool) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                lease = await queue.pop(self.redis, self.worker_id, 0.05 if burst else POP_TIMEOUT_S)
            except (RedisError, OSError) as e:
                log.warning("worker %s cannot reach Redis (%s); retrying in %.1f s", self.worker_id, e, backoff.delay_s)
                await backoff.wait()
                continue
            backoff.reset()
            if lease is None:
                if burst:
                    return
                continue
            self.jobs_in_flight += 1
            try:
                await self._handle(lease)
            finally:
                self.jobs_in_flight -= 1

    async def _handle(self, lease: queue.Lease) -> None:
        job = lease.job
        log.info("request %s started model=%s", job.request_id, job.model)
        # The status shown to clients is written alongside the start of the generation, not before it.
        marking = asyncio.create_task(self._mark_running(job.request_id))
        writer = StreamWriter(self.redis, job.request_id, self.settings.result_ttl_s) if job.stream else None
        result = await execute(self.backend, job, writer)
        await marking
        if writer is not None:
            try:
                await writer.close()
            except (RedisError, OSError) as e:  # the stream loses text; the result below still carries all of it
                log.warning("request %s: stream write failed (%s)", job.request_id, e)
        # The result is the job's only copy now: retry through a Redis outage, and never let a
        # cancellation interrupt the write half-way.
        backoff = Backoff()
        while True:
            try:
                held_in = keys.processing_key(self.worker_id)
                finishing = queue.finish(
                    self.redis, held_in, lease.raw, result, self.settings.result_ttl_s, streamed=job.stream
                )
                held = await asyncio.shield(finishing)
                break
            except (RedisError, OSError) as e:
                log.warning("request %s: result not stored yet (%s); retrying", job.request_id, e)
                await backoff.wait()
        if not held:
            log.warning("request %s: this worker's lease was taken (judged dead); result discarded", job.request_id)
            return
        log.info(
            "request %s %s in %.0f ms (%d tokens)",
            job.request_id,
            result.status,
            result.timings.inference_ms,
            result.usage.completion_tokens,
        )
        self.jobs_done += 1

    async def _mark_running(self, request_id: str) -> None:
        try:
            await queue.mark_running(self.redis, request_id)
        except (RedisError, OSError) as e:  # only the status shown to clients; the job itself goes on
            log.warning("request %s: could not mark it running (%s)", request_id, e)


def default_worker_id() -> str:
    """Host name plus a random suffix, so two workers on one machine never share a queue."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


async def register(settings: WorkerSettings, worker_id: str, model: str, backend_name: str) -> Registered:
    """`POST /register` to the coordinator, retrying with backoff until `register_timeout_s`."""
    body = WorkerRegistration(
        worker_id=worker_id,
        models=[model],
        backend=backend_name,
        slots=settings.slots,
        hardware=detect_hardware(),
        version=__version__,
    )
    url = settings.coordinator_url.rstrip("/") + "/register"
    deadline = time.monotonic() + settings.register_timeout_s
    backoff = Backoff(first_s=0.2, max_s=3.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            try:
                async with http.post(
                    url, data=body.model_dump_json(), headers={"content-type": "application/json"}
                ) as resp:
                    if resp.status == 200:
                        return Registered.model_validate_json(await resp.read())
                    if resp.status < 500 and resp.status != 429:  # our request is wrong: retrying cannot help
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
    backend = make_backend(settings)
    try:
        model = await backend.load(settings.model)
        if stop.is_set():  # told to stop while the model loaded: never join the pool
            return
        log.info("backend %s serves %s", backend.name, model)
        worker_id = settings.worker_id or default_worker_id()
        # socket_timeout above POP_TIMEOUT_S: a silently dropped connection fails instead of blocking forever.
        redis = Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=15)
        try:
            registered = await register(settings, worker_id, model, backend.name)
            log.info("worker %s registered with %s", worker_id, settings.coordinator_url)
            await Worker(redis, backend, registered, settings).run(stop, burst=burst)
        finally:
            await redis.aclose()
    finally:
        await backend.close()
