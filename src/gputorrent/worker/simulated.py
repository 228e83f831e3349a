"""Many simulated workers in one process, for scale benchmarks and tests (`bench/scale.py`).

Each simulated worker does what a real worker does to the pool, with the same code: it registers
through the coordinator's `POST /register`, beats with a real beat's three commands
(`registry.queue_beat`) on its own schedule, and takes, runs and finishes jobs through `RedisLink` with `slots` consumer
loops, each blocked on its own connection as a real one is. What they share is only what costs
a real pool nothing per worker: the process, one fake backend (instant unless `--token-ms`), one
heartbeat thread beating for all of them in turn (the beats due together in one round trip), and
one listener of every worker's `jobs:ended:{id}` channel. One process on one core cannot wake 10,000 consumers a second:
`--take-block-s` lets idle consumers block longer than a real worker's `POP_TIMEOUT_S` (bench/scale.py
says what that leaves out).

    python -m gputorrent.worker.simulated --count 1000 --coordinator http://127.0.0.1:8000 \\
        --redis-url redis://127.0.0.1:6379/0 --join-token KEY --model fake

It prints `ready N` once all N are registered and their consumer loops started (bench/scale.py
then waits until Redis counts them blocked waiting for work), and leaves the pool (deregisters
each) when it gets SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Sequence

import aiohttp

from gputorrent import __version__, pipelined, redis_client, registry
from gputorrent.protocol import Heartbeat, Registered, WorkerRegistration
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.retry import Backoff
from gputorrent.streams import StreamWriter
from gputorrent.worker.backends.fake import FakeBackend
from gputorrent.worker.ended import EndedJobs
from gputorrent.worker.executor import execute
from gputorrent.worker.link import RedisLink
from gputorrent.worker.main import POP_TIMEOUT_S, REDIS_CONNECT_TIMEOUT_S, REDIS_REPLY_TIMEOUT_S

log = logging.getLogger(__name__)

REGISTRATIONS_AT_ONCE = 32  # registrations in flight together: a burst a coordinator answers without timeouts
BEAT_TICK_S = 0.05  # the heartbeat thread wakes this often, and beats for the workers due then


class SimulatedWorker:
    """One logical worker: its registration, its link, and how many jobs it runs now."""

    def __init__(self, registered: Registered, link: RedisLink) -> None:
        self.registered = registered
        self.link = link
        self.jobs_in_flight = 0

    @property
    def worker_id(self) -> str:
        return self.registered.worker_id


class Simulation:
    """`count` simulated workers serving `model` on the fake backend, `slots` jobs at once each."""

    def __init__(
        self, *, count: int, coordinator_url: str, redis_url: str, join_token: str | None, model: str,
        slots: int = 1, token_delay_s: float = 0.0, id_prefix: str = "sim", take_block_s: float = POP_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.count = count
        self.coordinator_url = coordinator_url.rstrip("/")
        self.redis_url = redis_url
        self.join_token = join_token
        self.model = model
        self.slots = slots
        self.id_prefix = id_prefix
        self.take_block_s = take_block_s
        self.backend = FakeBackend(token_delay_s=token_delay_s)
        self.workers: list[SimulatedWorker] = []
        self.ended = EndedJobs()
        self._beats_stop = threading.Event()

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Register every worker, serve until `stop`, then leave the pool."""
        # One client for all: its shared connection carries every worker's scripts, and each blocked take
        # holds a connection of its own, as a real worker's does.
        redis = redis_client.async_client(
            self.redis_url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_REPLY_TIMEOUT_S - POP_TIMEOUT_S + self.take_block_s,  # a real worker's margin
        )
        pipelined.keep_idle_borrowed(redis, self.count * self.slots)
        try:
            await self._register_all(redis)
            beats = threading.Thread(target=self._beat_all, name="simulated heartbeats", daemon=True)
            beats.start()
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self.ended.run(redis, [w.worker_id for w in self.workers], stop))
                    for worker, _ in itertools.product(self.workers, range(self.slots)):
                        tasks.create_task(self._consume(worker, stop))
                    tasks.create_task(_freeze_heap(stop))
                    if ready is not None:
                        ready.set()
                    await stop.wait()
            finally:
                self._beats_stop.set()
                await asyncio.to_thread(beats.join)
                await self._leave_all()
        finally:
            await redis.aclose()

    async def _register_all(self, redis: RedisClient) -> None:
        headers = {"content-type": "application/json"}
        if self.join_token:
            headers["authorization"] = f"Bearer {self.join_token}"
        at_once = asyncio.Semaphore(REGISTRATIONS_AT_ONCE)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def register(index: int) -> SimulatedWorker:
                body = WorkerRegistration(
                    worker_id=f"{self.id_prefix}-{index:05d}", models=[self.model], backend=self.backend.name,
                    slots=self.slots, version=__version__,
                )  # fmt: skip
                backoff = Backoff(first_s=0.2, max_s=3.0)
                async with at_once:
                    while True:
                        try:
                            async with http.post(
                                self.coordinator_url + "/register", data=body.model_dump_json(), headers=headers
                            ) as resp:
                                if resp.status == 200:
                                    registered = Registered.model_validate_json(await resp.read())
                                    break
                                if resp.status < 500 and resp.status != 429:
                                    raise RuntimeError(f"registration refused ({resp.status}): {await resp.text()}")
                        except (aiohttp.ClientError, TimeoutError) as e:
                            log.info("registration of %s failed (%s); retrying", body.worker_id, e)
                        await backoff.wait()
                link = RedisLink(
                    redis, self.redis_url, registered.worker_id,
                    heartbeat_ttl_s=registered.heartbeat_timeout_s, max_attempts=3, result_ttl_s=3600,
                )  # fmt: skip
                return SimulatedWorker(registered, link)

            self.workers = list(await asyncio.gather(*(register(i) for i in range(self.count))))

    async def _consume(self, worker: SimulatedWorker, stop: asyncio.Event) -> None:
        """A real worker's consumer loop (`Worker._consume`), less health, drains and pulls."""
        backoff = Backoff()
        wait_first = False
        # Real workers start at different times, so their idle takes time out spread over the block.
        # Started together, these would all time out at once, every `take_block_s`: a burst of
        # thousands of looks that a measurement's window catches or misses. The first block is a
        # random share of it, so each consumer keeps a phase of its own. Never near 0: a BLPOP of 0 s
        # blocks for ever.
        block_s = random.uniform(min(0.05, self.take_block_s), self.take_block_s)
        while not stop.is_set():
            try:
                lease = await worker.link.take(block_s, [self.model], wait_first=wait_first)
            except REDIS_FAILURES as e:
                log.warning("worker %s cannot reach Redis (%s)", worker.worker_id, e)
                await backoff.wait()
                continue
            backoff.reset()
            block_s = self.take_block_s
            wait_first = lease is None or not lease.more_queued
            if lease is None:
                continue
            worker.jobs_in_flight += 1
            try:
                job = lease.job
                writer = StreamWriter(functools.partial(worker.link.append, lease))
                ended = self.ended.watch(job.request_id)
                try:
                    result = await execute(self.backend, job, writer if job.stream else None, ended,
                                           taken_at=lease.taken_at)  # fmt: skip
                finally:
                    self.ended.unwatch(job.request_id)
                if job.stream:
                    await writer.close()
                await worker.link.finish(lease, result)
            except REDIS_FAILURES as e:
                log.warning("worker %s lost a job's result (%s); the reaper hands it on", worker.worker_id, e)
            finally:
                worker.jobs_in_flight -= 1

    def _beat_all(self) -> None:
        """Beat for every worker in turn, spread evenly over the heartbeat interval (as real workers'
        beats are, each on its own clock), with a real beat's commands (`registry.queue_beat`); those of
        the workers due in one tick go in one round trip, which saves this process, not Redis, work."""
        if not self.workers:
            return
        interval_s = self.workers[0].registered.heartbeat_interval_s
        ticks = max(1, round(interval_s / BEAT_TICK_S))
        replied = registry.BEAT_REPLIES  # simulated workers have no swarm
        client = redis_client.sync_client(self.redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            due_at = time.monotonic()
            for tick in itertools.cycle(range(ticks)):
                if self._beats_stop.wait(max(0.0, due_at - time.monotonic())):
                    return
                due_at += interval_s / ticks
                due = self.workers[tick::ticks]
                with client.pipeline(transaction=False) as pipe:
                    for worker in due:
                        beat = Heartbeat(at=time.time(), jobs_in_flight=worker.jobs_in_flight)
                        registry.queue_beat(pipe, worker.worker_id, beat, worker.registered.heartbeat_timeout_s)
                    try:
                        replies = pipe.execute(raise_on_error=False)
                    except REDIS_FAILURES as e:
                        log.warning("heartbeats failed: %s", e)
                        continue
                for i, worker in enumerate(due):
                    try:
                        registry.beat_answer(worker.worker_id, replies[i * replied : (i + 1) * replied])
                    except REDIS_FAILURES as e:
                        log.warning("heartbeat of %s failed: %s", worker.worker_id, e)
        finally:
            client.close()

    async def _leave_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(*REDIS_FAILURES):
                await worker.link.leave()


HEAP_FREEZE_S = 1.0


async def _freeze_heap(stop: asyncio.Event) -> None:
    """Move what the process holds into the collector's permanent generation every `HEAP_FREEZE_S`.

    Thousands of workers' objects live here: a full collection walked all of them and held the
    process for up to half a second (bench/scale.py's p99), a pause no real worker, holding its own
    objects only, ever has. Cycles made and frozen within the second are never collected: a leak a
    simulation of minutes can afford."""
    while not stop.is_set():
        gc.freeze()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEAP_FREEZE_S)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gputorrent.worker.simulated", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, required=True, help="how many workers to simulate")
    parser.add_argument("--coordinator", required=True, help="the coordinator's URL")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--join-token", default=os.environ.get("GPUTORRENT_JOIN_TOKEN"))
    parser.add_argument("--model", default="fake")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--token-ms", type=float, default=0.0, help="the fake backend's time per token")
    parser.add_argument("--id-prefix", default="sim", help="worker ids are PREFIX-00000, PREFIX-00001, …")
    parser.add_argument(
        "--take-block-s", type=float, default=POP_TIMEOUT_S,
        help=f"how long an idle consumer blocks before it looks again (a real worker: {POP_TIMEOUT_S:g})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.count < 1 or args.slots < 1:
        parser.error("--count and --slots must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    simulation = Simulation(
        count=args.count, coordinator_url=args.coordinator, redis_url=args.redis_url, join_token=args.join_token,
        model=args.model, slots=args.slots, token_delay_s=args.token_ms / 1000, id_prefix=args.id_prefix,
        take_block_s=args.take_block_s,
    )  # fmt: skip

    async def run() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        async def announce() -> None:
            await ready.wait()
            print(f"ready {len(simulation.workers)}", flush=True)

        announcing = asyncio.create_task(announce())
        await simulation.run(stop, ready)
        announcing.cancel()

    asyncio.run(run())


if __name__ == "__main__":
    main()
