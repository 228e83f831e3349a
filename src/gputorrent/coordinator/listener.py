"""The coordinator's one pub/sub connection: the pool's announcements, each channel to its handler.

`results:ready` wakes requests waiting for results (`ResultWaiter`); `keys:revoked` drops a key
from the key cache (`KeyCache`). While the connection is down, announcements are missed: each
handler's owner is told (`lost`) and falls back to reading Redis until the next subscription.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gputorrent.retry import Backoff

log = logging.getLogger(__name__)

LISTEN_SLICE_S = 0.25  # how long one read of the channels blocks; bounds how long `stop()` takes


class Subscriber(Protocol):
    def subscribed(self) -> None:
        """The channels are subscribed: from now on no announcement is missed."""

    def lost(self) -> None:
        """The connection is down: announcements may be missed until `subscribed()` again."""


class Listener:
    """Runs the subscription (`run()`, a task of the app) until `stop()`, reconnecting with backoff."""

    def __init__(
        self, redis: Redis, handlers: Mapping[str, Callable[[str], None]], subscribers: tuple[Subscriber, ...]
    ) -> None:
        self._redis = redis
        self._handlers = dict(handlers)
        self._subscribers = subscribers
        self._stopping = False

    def stop(self) -> None:
        """Make `run()` return within `LISTEN_SLICE_S`."""
        self._stopping = True

    async def run(self) -> None:
        backoff = Backoff()
        while not self._stopping:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(*self._handlers)
                    unconfirmed = set(self._handlers)
                    while not self._stopping:
                        message = await pubsub.get_message(timeout=LISTEN_SLICE_S)
                        if message is None:
                            continue
                        if message["type"] == "message":
                            self._handlers[message["channel"]](message["data"])
                        elif message["type"] == "subscribe" and unconfirmed:
                            # Told only once Redis confirms every channel: from then on nothing is missed.
                            unconfirmed.discard(message["channel"])
                            if not unconfirmed:
                                backoff.reset()
                                for subscriber in self._subscribers:
                                    subscriber.subscribed()
            except (RedisError, OSError) as e:
                log.warning("the coordinator's listener lost Redis (%s); retrying in %.1f s", e, backoff.delay_s)
                self._lost()
                await backoff.wait()
            else:
                self._lost()

    def _lost(self) -> None:
        for subscriber in self._subscribers:
            subscriber.lost()
