"""The coordinator's pub/sub connections: the pool's announcements, each channel to its handler.

`results:ready` wakes requests waiting for results (`ResultWaiter`); `keys:revoked` drops a key
from the key cache (`KeyCache`). While the connection is down, announcements are missed: each
handler's owner is told (`lost`) and falls back to reading Redis until the next subscription.

On a Redis Cluster the results come on shard channels, one a cell (`keys.results_channel`), each
published by the primary serving its cell: the listener reads each on a connection of its own to
that primary, so no announcement crosses the cluster bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError, RedisClusterException

from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)

# A link cut silently (a host gone, a cable out) raises nothing on a subscription: a connection quiet
# this long is pinged, and one that says nothing for LISTENER_SILENCE_S is taken as dead.
LISTENER_PING_S = 5.0
LISTENER_SILENCE_S = 3 * LISTENER_PING_S


class Subscriber(Protocol):
    def subscribed(self) -> None:
        """The channels are subscribed: from now on no announcement is missed."""

    def lost(self) -> None:
        """The connection is down: announcements may be missed until `subscribed()` again."""


@dataclass(frozen=True)
class _Group:
    """Channels read on one connection, and whom to tell when it is subscribed or lost."""

    handlers: dict[str, Callable[[str], None]]
    subscribers: tuple[Subscriber, ...]
    sharded: bool  # one shard channel, read on the primary serving its slot


class Listener:
    """Runs the subscriptions (`run()`, a task of the app) until `stop()`, each reconnecting with
    backoff on its own.

    It is redis-py's `PubSub` on a connection of the client's pool, so TLS, ACL users and timeouts
    are as configured there. A reader of our own (hiredis on the connection's socket) saved about
    9 µs of CPU an announcement against it on redis-py 8.2 (docs/benchmarks.md, "The Redis path"),
    under the bar for keeping code of our own.

    redis-py tries to reconnect a subscription whose connection broke (and subscribes again) before
    it raises, and within its retries does not raise at all: the owners are told `lost` when the
    error comes out, after that try (up to the connect timeout), or when Redis confirms the channels
    anew after a reconnect that worked; either way they re-read Redis then.

    Each shard channel (on a Redis Cluster) has a connection and a loop of its own, to the primary
    serving its slot: a primary that fails or moves a slot costs only its own channels (their
    subscribers are told), and redis-py's resubscription after a reconnect, which names all of a
    connection's shard channels in one `SSUBSCRIBE`, names one slot.
    """

    def __init__(
        self,
        redis: RedisClient,
        handlers: Mapping[str, Callable[[str], None]],
        subscribers: tuple[Subscriber, ...],
        shard_handlers: Mapping[str, Callable[[str], None]] | None = None,
        shard_subscribers: tuple[Subscriber, ...] = (),
    ) -> None:
        """`shard_handlers`: shard channels (`SSUBSCRIBE`, on a Redis Cluster only), whose losses are
        told to `shard_subscribers`."""
        if shard_handlers and not isinstance(redis, RedisCluster):
            raise ValueError("shard channels are read from a Redis Cluster's primaries")
        self._redis = redis
        self._groups = [_Group(dict(handlers), subscribers, sharded=False)] if handlers else []
        self._groups += [
            _Group({channel: handler}, shard_subscribers, sharded=True)
            for channel, handler in (shard_handlers or {}).items()
        ]
        self._stopping = False
        self._steps: set[asyncio.Task[None]] = set()
        self._cut: set[asyncio.Task[None]] = set()  # steps cancelled by `reconnect()` or `stop()`

    def stop(self) -> None:
        """Make `run()` return: each current step (a read, or a wait before retrying) is cancelled."""
        self._stopping = True
        self.reconnect()

    def reconnect(self) -> None:
        """Subscribe anew (the primary was failed over): the reads are cancelled, and `run()` makes
        other subscriptions, on new connections of the pool, and so through the Sentinels."""
        for step in self._steps:
            if not step.done():  # one that ended by itself ended for its own reason
                self._cut.add(step)
                step.cancel()

    async def run(self) -> None:
        loops = [asyncio.create_task(self._keep(group)) for group in self._groups]
        try:
            await asyncio.gather(*loops)
        finally:  # one loop's unexpected error, or run()'s cancellation, ends them all
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _keep(self, group: _Group) -> None:
        backoff = Backoff()
        read_slots_again = False  # after a failure: the channel's slot may have another primary now
        try:
            while not self._stopping:
                try:
                    listened = await self._until_interrupted(self._listen(group, backoff, read_slots_again))
                    if not listened and not self._stopping:
                        self._lost(group)  # `reconnect()`: subscribed again at once
                    read_slots_again = False
                except REDIS_FAILURES as e:
                    if self._stopping:
                        break
                    channels = ", ".join(group.handlers)
                    log.warning("the coordinator's listener lost %s (%s); retrying in %.1f s", channels, e,
                                backoff.delay_s)  # fmt: skip
                    self._lost(group)
                    read_slots_again = True
                    await self._until_interrupted(backoff.wait())
        finally:
            self._lost(group)

    async def _until_interrupted(self, step: Coroutine[Any, Any, None]) -> bool:
        """Run `step` as a task that `reconnect()` and `stop()` cancel; False when they did."""
        task = asyncio.create_task(step)
        self._steps.add(task)
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
            if task in self._cut:
                return False
            raise
        finally:
            self._steps.discard(task)
            self._cut.discard(task)

    async def _listen(self, group: _Group, backoff: Backoff, read_slots_again: bool) -> None:
        """Subscribe and hand each announcement to its handler until the connection fails for good
        (an error) or the read is cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            if group.sharded:
                (channel,) = group.handlers
                pubsub = await stack.enter_async_context(await self._shard_pubsub(channel, stack, read_slots_again))
                await pubsub.ssubscribe(channel)
            else:
                pubsub = await stack.enter_async_context(self._redis.pubsub())
                await pubsub.subscribe(*group.handlers)
            await self._read(pubsub, group, backoff)

    async def _shard_pubsub(self, channel: str, stack: contextlib.AsyncExitStack, read_slots_again: bool) -> PubSub:
        """A pub/sub connection of its own to the primary serving `channel`'s slot, made as the cluster
        client makes that node's (TLS, user, timeouts)."""
        assert isinstance(self._redis, RedisCluster)
        try:
            if read_slots_again:
                await self._redis.nodes_manager.initialize()
            else:
                await self._redis.initialize()  # nothing to do once the client has read the slot map
            node = self._redis.get_node_from_key(channel)
        except RedisClusterException as e:  # not a RedisError: no node answered
            raise ConnectionError(f"the Redis Cluster's slot map cannot be read now: {e}") from e
        if node is None:
            raise ConnectionError(f"no primary of the Redis Cluster serves {channel} now")
        pool = ConnectionPool(connection_class=node.connection_class, max_connections=1, **node.connection_kwargs)
        stack.push_async_callback(pool.disconnect)
        return Redis(connection_pool=pool).pubsub()

    async def _read(self, pubsub: PubSub, group: _Group, backoff: Backoff) -> None:
        """Hand on what one connection hears."""
        unconfirmed = set(group.handlers)
        loop = asyncio.get_running_loop()
        heard_at = pinged_at = loop.time()
        while True:
            message = await pubsub.get_message(timeout=LISTENER_PING_S)
            now = loop.time()
            if message is not None:
                heard_at = now
                self._received(message, group, unconfirmed, backoff)
            elif now - heard_at > LISTENER_SILENCE_S:
                raise ConnectionError(f"the subscription to {', '.join(group.handlers)} went silent")
            elif now - pinged_at >= LISTENER_PING_S:
                await pubsub.ping()
                pinged_at = now

    def _received(self, message: dict[str, Any], group: _Group, unconfirmed: set[str], backoff: Backoff) -> None:
        kind, channel = message["type"], message["channel"]
        if kind in ("message", "smessage"):
            group.handlers[channel](message["data"])
        elif kind == "sunsubscribe":  # the channel's slot moved to another primary: subscribe anew there
            raise ConnectionError(f"the Redis Cluster moved shard channel {channel} to another primary")
        elif kind in ("subscribe", "ssubscribe"):
            if not unconfirmed:  # subscribed again after a reconnect: announcements were missed meanwhile
                self._lost(group)
                unconfirmed.update(group.handlers)
            # Told only once Redis confirms every channel: from then on nothing is missed.
            unconfirmed.discard(channel)
            if not unconfirmed:
                backoff.reset()
                for subscriber in group.subscribers:
                    subscriber.subscribed()

    def _lost(self, group: _Group) -> None:
        for subscriber in group.subscribers:
            subscriber.lost()
