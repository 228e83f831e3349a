"""The coordinator's one pub/sub connection: the pool's announcements, each channel to its handler.

`results:ready` wakes requests waiting for results (`ResultWaiter`); `keys:revoked` drops a key
from the key cache (`KeyCache`). While the connection is down, announcements are missed: each
handler's owner is told (`lost`) and falls back to reading Redis until the next subscription.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    def subscribed(self) -> None:
        """The channels are subscribed: from now on no announcement is missed."""

    def lost(self) -> None:
        """The connection is down: announcements may be missed until `subscribed()` again."""


class Listener:
    """Runs the subscription (`run()`, a task of the app) until `stop()`, reconnecting with backoff.

    It is redis-py's `PubSub` on a connection of the client's pool, so TLS, ACL users and timeouts
    are as configured there. A reader of our own (hiredis on the connection's socket) saved about
    9 µs of CPU an announcement against it on redis-py 8.2 (docs/benchmarks.md, "The Redis path"),
    under the bar for keeping code of our own.

    redis-py tries to reconnect a subscription whose connection broke (and subscribes again) before
    it raises, and within its retries does not raise at all: the owners are told `lost` when the
    error comes out, after that try (up to the connect timeout), or when Redis confirms the channels
    anew after a reconnect that worked; either way they re-read Redis then.
    """

    def __init__(
        self, redis: RedisClient, handlers: Mapping[str, Callable[[str], None]], subscribers: tuple[Subscriber, ...]
    ) -> None:
        self._redis = redis
        self._handlers = dict(handlers)
        self._subscribers = subscribers
        self._stopping = False
        self._step: asyncio.Task[None] | None = None
        self._cut = False  # `_step` was cancelled by `reconnect()` or `stop()`

    def stop(self) -> None:
        """Make `run()` return: its current step (a read, or a wait before retrying) is cancelled."""
        self._stopping = True
        self.reconnect()

    def reconnect(self) -> None:
        """Subscribe anew (the primary was failed over): the read is cancelled, and `run()` makes
        another subscription, on a new connection of the pool, and so through the Sentinels."""
        if self._step is not None:
            self._cut = True
            self._step.cancel()

    async def run(self) -> None:
        backoff = Backoff()
        while not self._stopping:
            try:
                if not await self._until_interrupted(self._listen(backoff)) and not self._stopping:
                    self._lost()  # `reconnect()`: subscribed again at once
            except REDIS_FAILURES as e:
                if self._stopping:
                    break
                log.warning("the coordinator's listener lost Redis (%s); retrying in %.1f s", e, backoff.delay_s)
                self._lost()
                await self._until_interrupted(backoff.wait())
        self._lost()

    async def _until_interrupted(self, step: Coroutine[Any, Any, None]) -> bool:
        """Run `step` as a task that `reconnect()` and `stop()` cancel; False when they did."""
        self._cut = False
        task = self._step = asyncio.create_task(step)
        current = asyncio.current_task()
        try:
            await task
            return True
        except asyncio.CancelledError:
            if current is not None and current.cancelling():
                raise  # run() itself was cancelled, not only its step
            return False
        except REDIS_FAILURES:
            # redis-py can turn a cancelled read into a ConnectionError: run()'s own cancellation, or a cut.
            if current is not None and current.cancelling():
                raise asyncio.CancelledError from None
            if self._cut:
                return False
            raise
        finally:
            self._step = None

    async def _listen(self, backoff: Backoff) -> None:
        """Subscribe and hand each announcement to its handler until the connection fails for good
        (an error) or the read is cancelled."""
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(*self._handlers)
            unconfirmed = set(self._handlers)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._received(message, unconfirmed, backoff)

    def _received(self, message: dict[str, Any], unconfirmed: set[str], backoff: Backoff) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "message":
            self._handlers[channel](message["data"])
        elif kind == "subscribe":
            if not unconfirmed:  # subscribed again after a reconnect: announcements were missed meanwhile
                self._lost()
                unconfirmed.update(self._handlers)
            # Told only once Redis confirms every channel: from then on nothing is missed.
            unconfirmed.discard(channel)
            if not unconfirmed:
                backoff.reset()
                for subscriber in self._subscribers:
                    subscriber.subscribed()

    def _lost(self) -> None:
        for subscriber in self._subscribers:
            subscriber.lost()
