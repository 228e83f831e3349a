"""Waiting for results without polling: one pub/sub listener per coordinator wakes the waiters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent import keys, queue
from gputorrent.protocol import JobResult, JobStatus
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)

# A waiter re-reads Redis at least this often, so a missed notification (listener
# reconnecting) delays an answer by at most this much instead of losing it.
RECHECK_INTERVAL_S = 1.0
LISTEN_SLICE_S = 0.25  # how long one read of the channel blocks; bounds how long `stop()` takes


class ResultWaiter:
    """Lets requests wait for `result:{request_id}`; `run()` is the listener task."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._stopping = False

    def stop(self) -> None:
        """Make `run()` return within `LISTEN_SLICE_S`."""
        self._stopping = True

    async def run(self) -> None:
        """Listen on the results channel until `stop()`, reconnecting with backoff."""
        backoff = Backoff()
        while not self._stopping:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.RESULTS_CHANNEL)
                    backoff.reset()
                    while not self._stopping:
                        message = await pubsub.get_message(timeout=LISTEN_SLICE_S)
                        if message is not None and message["type"] == "message":
                            self._wake(message["data"])
            except (RedisError, OSError) as e:
                log.warning("result listener lost Redis (%s); retrying in %.1f s", e, backoff.delay_s)
                self._wake_all()
                await backoff.wait()

    async def wait(self, request_id: str, timeout_s: float) -> JobResult | JobStatus | None:
        """The result once it exists, or the latest status after `timeout_s`; None for an unknown id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        event = asyncio.Event()
        self._events[request_id].add(event)
        try:
            while True:
                event.clear()  # cleared before the read, so a result written after it still wakes us
                found = await queue.lookup(self._redis, request_id)
                remaining_s = deadline - loop.time()
                if not isinstance(found, JobStatus) or remaining_s <= 0:
                    return found
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining_s, RECHECK_INTERVAL_S))
        finally:
            waiting = self._events[request_id]
            waiting.discard(event)
            if not waiting:
                del self._events[request_id]

    def _wake(self, request_id: str) -> None:
        for event in self._events.get(request_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for waiting in self._events.values():
            for event in waiting:
                event.set()
