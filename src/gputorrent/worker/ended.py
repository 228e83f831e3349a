"""Hears which running jobs were ended elsewhere (cancelled, timed out, client gone) so they stop.

`queue.end` writes the job's result and announces its id on its worker's channel
(`jobs:ended:{worker_id}`); a worker linked to Redis listens there (`run`) and sets the job's
event, and the executor checks it at every token. After each (re)subscription the
`cancel:{request_id}` keys of the watched jobs are read, so an announcement missed while the
connection was down is not lost. An announcement heard for a job not watched yet (ended in the
moment between the worker's take and the start of its run) is kept, so the job stops as soon as
its run starts watching. A worker linked through the coordinator learns the same from each
heartbeat's answer (`end`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from gputorrent import keys
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)

POLL_S = 1.0  # how long one read of the channel waits; also how fast a stop is noticed
# Announcements kept for jobs not watched yet: a job ended between its take and its run is watched
# milliseconds after its announcement, so a few hundred, for half a minute, cover every slot. Not
# longer: a client may use a request id again once its result expired, and that job must run.
UNWATCHED_KEPT = 256
UNWATCHED_KEEP_S = 30.0


class EndedJobs:
    """One event per running job, set when the job is ended elsewhere."""

    def __init__(self) -> None:
        self._watched: dict[str, asyncio.Event] = {}
        self._ended_unwatched: OrderedDict[str, float] = OrderedDict()  # request id -> when heard (monotonic)
        self.unwatched_keep_s = UNWATCHED_KEEP_S
        self._resubscribe = False

    def watch(self, request_id: str) -> asyncio.Event:
        """The event of a job starting its run: set already if its end was heard before."""
        event = self._watched[request_id] = asyncio.Event()
        heard_at = self._ended_unwatched.pop(request_id, None)
        if heard_at is not None and time.monotonic() - heard_at < self.unwatched_keep_s:
            event.set()
        return event

    def unwatch(self, request_id: str) -> None:
        self._watched.pop(request_id, None)

    def running(self) -> list[str]:
        """The request ids watched now: the jobs running on this worker."""
        return list(self._watched)

    def end(self, request_ids: list[str]) -> None:
        """Stop these jobs at their next token (they were ended elsewhere)."""
        for request_id in request_ids:
            if event := self._watched.get(request_id):
                event.set()

    def end_all_here(self) -> None:
        """Stop every running job at its next token (the worker handed them on)."""
        for event in self._watched.values():
            event.set()

    async def run(self, redis: RedisClient, worker_ids: list[str], stop: asyncio.Event) -> None:
        """Listen on the channels of `worker_ids` (the workers this process runs) until `stop` is set,
        resubscribing with backoff when Redis fails."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(*map(keys.ended_channel, worker_ids))
                    await self._catch_up(redis)
                    backoff.reset()
                    while not stop.is_set() and not self._resubscribe:
                        message = await pubsub.get_message(timeout=POLL_S)
                        if message is not None:
                            self._heard(str(message["data"]))
            except REDIS_FAILURES as e:
                log.warning("cannot hear ended jobs (%s); retrying in %.1f s", e, backoff.delay_s)
                await backoff.wait()
            self._resubscribe = False

    def _heard(self, request_id: str) -> None:
        if event := self._watched.get(request_id):
            event.set()
            return
        # Not running here yet: taken a moment ago and about to be watched (or never taken: ended
        # while queued, and then never run here, so keeping it a while harms nothing).
        self._ended_unwatched[request_id] = time.monotonic()
        self._ended_unwatched.move_to_end(request_id)
        if len(self._ended_unwatched) > UNWATCHED_KEPT:
            self._ended_unwatched.popitem(last=False)

    def resubscribe(self) -> None:
        """Subscribe anew within `POLL_S` (the primary was failed over: the subscription's connection
        stays with the old one, which will never publish again)."""
        self._resubscribe = True

    async def _catch_up(self, redis: RedisClient) -> None:
        watched = list(self._watched.items())
        if not watched:
            return
        async with redis.pipeline(transaction=False) as pipe:
            for request_id, _ in watched:
                pipe.exists(keys.cancel_key(request_id))
            found = await pipe.execute()
        for (_, event), ended in zip(watched, found, strict=True):
            if ended:
                event.set()
