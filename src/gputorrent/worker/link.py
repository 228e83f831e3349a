"""The worker's link to the pool's state: every read and write a worker makes outside its backend.

Two implementations, one interface, chosen by `GPUTORRENT_LINK`:

- `RedisLink` (`redis`, the default): straight to Redis, for workers trusted with Redis
  credentials (the pool's own machines on the LAN).
- `CoordinatorLink` (`coordinator`, in `coordinator_link.py`): every call goes to the coordinator's
  `/worker` routes with the worker's id and secret, and the coordinator runs the same functions on
  Redis for that worker only. The worker holds no Redis credentials.

A failed call raises one of `redis_client.REDIS_FAILURES` (`CoordinatorUnreachable` is a `ConnectionError`),
which the worker's loops retry with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from redis import RedisCluster as SyncRedisCluster

from gputorrent import keys, leases, queue, redis_client, registry, streams
from gputorrent.protocol import BeatAnswer, Group, Heartbeat, JobResult
from gputorrent.redis_client import RedisClient
from gputorrent.worker.ended import EndedJobs
from gputorrent.worker.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)


class HeartbeatSender(Protocol):
    """Sends beats from the heartbeat thread, on a connection of its own (blocking calls)."""

    def send(self, heartbeat: Heartbeat, running: list[str]) -> BeatAnswer: ...

    def close(self) -> None: ...


class PoolLink(Protocol):
    """What a worker does to the pool's state, always as its own id."""

    # Seconds between two looks for orphaned jobs (`reclaim_orphans`): longer than a take's reply can
    # be on its way, or a job whose reply is merely late would be queued again while it runs.
    orphan_check_s: float
    # Whether cancelling a take stops it where the pool's state lives: then a stop may cut off an
    # idle consumer's long block (`Worker._take`) rather than wait it out.
    takes_cancel_at_once: bool

    async def recover(self) -> int:
        """Queue again, counting an attempt, what a previous run of this worker id left unfinished."""
        ...

    async def take(self, timeout_s: float, models: Sequence[str], *, wait_first: bool = False) -> queue.Lease | None:
        """Lease the next job for this worker (its queue, or the shared queues of `models`); None
        when none came within about `timeout_s`. `wait_first`: the last take left nothing queued (see
        `queue.pop`). Raises `WorkerGone` when the pool no longer knows this worker: it stops."""
        ...

    async def sent_so_far(self, request_id: str) -> tuple[str, int]:
        """The text (and its token count) an earlier attempt of a held job already streamed."""
        ...

    async def append(self, lease: queue.Lease, text: str, tokens: int) -> bool:
        """Add text to a held job's stream; False once the job is no longer this worker's (or, with
        the lease's fence, once it moved on since it was taken)."""
        ...

    async def finish(self, lease: queue.Lease, result: JobResult) -> bool:
        """Store the result while the lease holds; False (nothing written) when it was lost."""
        ...

    async def add_model(self, lease: queue.Lease) -> bool:
        """Add the model of a held pull job (which succeeded) to this worker's registration, so routing
        and the model listings see it; False when the job is no longer this worker's, or the
        registration cannot take it (see `registry.add_model`)."""
        ...

    async def set_group(self, group: Group) -> bool:
        """Show where this worker's split model lies now (its group re-formed); False when it is no
        longer registered."""
        ...

    async def fail_over(self, lease: queue.Lease) -> bool:
        """Hand a job the backend could not run to another worker (see `leases.fail_over`)."""
        ...

    async def hand_on(self, *, held: bool) -> int:
        """Give this worker's queue (with `held`, its held jobs) to other live workers."""
        ...

    async def reclaim_orphans(self, held: set[str], suspects: set[str]) -> tuple[int, set[str]]:
        """See `leases.reclaim_orphans`; `held` and `suspects` are request ids."""
        ...

    async def run_listeners(
        self, ended: EndedJobs, telemetry: WorkerTelemetry, interval_s: float, stop: asyncio.Event
    ) -> None:
        """Until `stop`: hear which running jobs were ended elsewhere, and add the finished jobs'
        figures to the pool's history (where the link does that itself)."""
        ...

    def heartbeat_sender(self, *, swarm_epoch: bool) -> HeartbeatSender:
        """A sender of this worker's beats; their answers carry the swarm's epoch if `swarm_epoch` (a
        worker with a swarm)."""
        ...

    async def leave(self) -> bool:
        """Leave the registry (only with empty lists; else just mark this worker gone)."""
        ...

    async def close(self) -> None: ...


class RedisLink:
    """Straight to Redis (`redis` is the worker's own client, `redis_url` opens the heartbeat's)."""

    orphan_check_s = 1.0  # a pop's reply is lost with its connection, never late by seconds
    takes_cancel_at_once = True  # its blocked command dies with its connection, which the cancel closes

    def __init__(
        self, redis: RedisClient, redis_url: str, worker_id: str, *, heartbeat_ttl_s: float, max_attempts: int,
        result_ttl_s: int, registered_at: float | None = None,
    ) -> None:  # fmt: skip
        self.redis = redis
        self._redis_url = redis_url
        self.worker_id = worker_id
        self._registered_at = registered_at  # `Registered.registered_at`: its beats tell a new registration by it
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._max_attempts = max_attempts
        self._result_ttl_s = result_ttl_s
        self._heartbeats: list[_RedisHeartbeat] = []
        self._ended: EndedJobs | None = None

    async def recover(self) -> int:
        return await queue.recover(self.redis, self.worker_id, self._max_attempts, self._result_ttl_s)

    async def take(self, timeout_s: float, models: Sequence[str], *, wait_first: bool = False) -> queue.Lease | None:
        return await queue.pop(
            self.redis, self.worker_id, timeout_s, models, result_ttl_s=self._result_ttl_s, wait_first=wait_first,
            presence_ttl_s=self._heartbeat_ttl_s,
        )  # fmt: skip

    async def sent_so_far(self, request_id: str) -> tuple[str, int]:
        return await streams.sent_so_far(self.redis, request_id)

    async def append(self, lease: queue.Lease, text: str, tokens: int) -> bool:
        return await streams.append(
            self.redis, lease.job.request_id, self.worker_id, text, tokens, self._result_ttl_s, fence=lease.fence
        )

    async def finish(self, lease: queue.Lease, result: JobResult) -> bool:
        held_in = keys.held_in(self.worker_id, lease.job.request_id)
        return await queue.finish(
            self.redis, held_in, result, self._result_ttl_s, streamed=lease.job.stream, fence=lease.fence
        )

    async def add_model(self, lease: queue.Lease) -> bool:
        return await leases.add_pulled_model(self.redis, self.worker_id, lease.job, registered_at=self._registered_at)

    async def set_group(self, group: Group) -> bool:
        return await registry.set_group(self.redis, self.worker_id, group, registered_at=self._registered_at)

    async def fail_over(self, lease: queue.Lease) -> bool:
        return await leases.fail_over(
            self.redis, self.worker_id, lease.job, max_attempts=self._max_attempts, ttl_s=self._result_ttl_s,
            fence=lease.fence,
        )  # fmt: skip

    async def hand_on(self, *, held: bool) -> int:
        return await leases.hand_on_own(
            self.redis, self.worker_id, held=held, max_attempts=self._max_attempts, ttl_s=self._result_ttl_s
        )

    async def reclaim_orphans(self, held: set[str], suspects: set[str]) -> tuple[int, set[str]]:
        return await leases.reclaim_orphans(
            self.redis, self.worker_id, held, suspects, self._result_ttl_s, registered_at=self._registered_at
        )

    async def run_listeners(
        self, ended: EndedJobs, telemetry: WorkerTelemetry, interval_s: float, stop: asyncio.Event
    ) -> None:
        self._ended = ended
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(ended.run(self.redis, [self.worker_id], stop))
            tasks.create_task(telemetry.run(self.redis, interval_s, stop))
            tasks.create_task(redis_client.follow_failovers(self.redis, self._primary_switched, stop))

    async def _primary_switched(self, address: str) -> None:
        log.warning(
            "worker %s: the Sentinels failed the Redis primary over to %s; reconnecting", self.worker_id, address
        )
        await redis_client.reconnect(self.redis)
        for heartbeat in self._heartbeats:
            heartbeat.reconnect()
        if self._ended is not None:
            self._ended.resubscribe()

    def heartbeat_sender(self, *, swarm_epoch: bool) -> HeartbeatSender:
        heartbeat = _RedisHeartbeat(
            self._redis_url, self.worker_id, self._heartbeat_ttl_s, swarm_epoch, self._registered_at
        )
        self._heartbeats.append(heartbeat)
        return heartbeat

    async def leave(self) -> bool:
        return await registry.deregister(self.redis, self.worker_id)

    async def close(self) -> None:
        await self.redis.aclose()


# Every this many beats a worker linked to Redis reads its record (about 20 s at the default interval),
# and at the first beat that gets through after one that failed: a worker back after it was removed
# drains and stops, rather than beat unlisted; one whose id another process registered meanwhile stops.
REGISTRATION_LOOK_EVERY = 10


class _RedisHeartbeat:
    """Beats on a blocking client of its own: the `jobs:ended:{id}` listener already tells of ended jobs."""

    def __init__(
        self, redis_url: str, worker_id: str, ttl_s: float, swarm_epoch: bool, registered_at: float | None
    ) -> None:
        # Bounded as the coordinator's: a beat to a primary cut off fails soon and the next one asks the
        # Sentinels again, well inside the heartbeat timeout.
        self._client = redis_client.sync_client(redis_url, socket_connect_timeout=2, socket_timeout=2)
        self._worker_id = worker_id
        self._ttl_s = ttl_s
        self._swarm_epoch = swarm_epoch
        self._registered_at = registered_at
        self._beats = 0
        self._look_next = False  # a beat failed: the next one that gets through reads the record
        self._beat_at: float | None = None  # monotonic time of the last beat that got through

    def send(self, heartbeat: Heartbeat, running: list[str]) -> BeatAnswer:
        self._beats += 1
        now = time.monotonic()
        # While this worker cannot beat for longer than the heartbeat timeout (Redis out of reach, or the
        # process paused: a stall, a suspended machine) its id may be taken: the first beat after looks.
        lapsed = self._beat_at is not None and now - self._beat_at > self._ttl_s
        look = self._look_next or lapsed or self._beats % REGISTRATION_LOOK_EVERY == 0
        self._look_next = True
        answer = registry.beat(
            self._client, self._worker_id, heartbeat, self._ttl_s, swarm_epoch=self._swarm_epoch,
            registered=look, registered_at=self._registered_at,
        )  # fmt: skip
        with self._client.pipeline(transaction=False) as pipe:  # its presence where it runs jobs of other cells
            if leases.queue_presence(pipe, self._worker_id, running, self._ttl_s):
                pipe.execute()
        self._look_next = False
        self._beat_at = now
        return answer

    def reconnect(self) -> None:
        """The next beat asks the Sentinels where the primary is (called from the event loop's thread:
        redis-py's pool locks its own lists)."""
        if isinstance(self._client, SyncRedisCluster):
            return  # it follows its slots itself (MOVED), on a Sentinel's word or not
        self._client.connection_pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        self._client.close()
