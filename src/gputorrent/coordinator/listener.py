"""The coordinator's one pub/sub connection: the pool's announcements, each channel to its handler.

`results:ready` wakes requests waiting for results (`ResultWaiter`); `keys:revoked` drops a key
from the key cache (`KeyCache`). While the connection is down, announcements are missed: each
handler's owner is told (`lost`) and falls back to reading Redis until the next subscription.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, RedisError, ResponseError

from gputorrent.pipelined import READ_SIZE
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    def subscribed(self) -> None:
        """The channels are subscribed: from now on no announcement is missed."""

    def lost(self) -> None:
        """The connection is down: announcements may be missed until `subscribed()` again."""


class Listener:
    """Runs the subscription (`run()`, a task of the app) until `stop()`, reconnecting with backoff.

    It reads the subscription's connection itself, parsing with hiredis: every non-streamed result
    waits for an announcement, and one arriving on its own cost about 145 µs of CPU through
    redis-py's `PubSub` when this was written, against about 70 µs this way (the event loop's
    wake-up included). On redis-py 8.2 the gap is down to about 9 µs (docs/benchmarks.md, "The
    Redis path"), under the bar for keeping code of our own: redis-py's `PubSub` should replace it.
    The connection comes from the client's pool, so TLS, ACL users and timeouts are as configured
    there (as `gputorrent.pipelined` takes its own).
    """

    def __init__(
        self, redis: Redis, handlers: Mapping[str, Callable[[str], None]], subscribers: tuple[Subscriber, ...]
    ) -> None:
        self._redis = redis
        self._handlers = dict(handlers)
        self._subscribers = subscribers
        self._stopping = False
        self._connection: AbstractConnection | None = None

    def stop(self) -> None:
        """Make `run()` return: the subscription's connection is closed under it."""
        self._stopping = True
        self.reconnect()

    def reconnect(self) -> None:
        """Subscribe anew (the primary was failed over): the connection is closed under `run()`, which
        makes another, through the pool and so the Sentinels."""
        if self._connection is not None and self._connection._writer is not None:
            self._connection._writer.close()

    async def run(self) -> None:
        backoff = Backoff()
        while not self._stopping:
            try:
                await self._listen(backoff)
            except (RedisError, OSError) as e:
                if self._stopping:
                    break
                log.warning("the coordinator's listener lost Redis (%s); retrying in %.1f s", e, backoff.delay_s)
                self._lost()
                await backoff.wait()
        self._lost()

    async def _listen(self, backoff: Backoff) -> None:
        """Subscribe on a connection of the pool's and hand each announcement to its handler until the
        connection ends (an error) or `stop()` closes it (a return)."""
        pool = self._redis.connection_pool
        connection = self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            reader, writer = connection._reader, connection._writer
            if reader is None or writer is None:
                raise ConnectionError("the connection to Redis is closed")
            # A payload that is not UTF-8 (published by something else) is replaced, not the end of the listener.
            parser = hiredis.Reader(replyError=ResponseError, encoding="utf-8", errors="replace")
            writer.write(hiredis.pack_command(("SUBSCRIBE", *self._handlers)))  # type: ignore[arg-type]
            unconfirmed = set(self._handlers)
            while not self._stopping:
                data = await reader.read(READ_SIZE)
                if not data:
                    if self._stopping:
                        return
                    raise ConnectionError("Redis closed the connection")
                try:
                    parser.feed(data)
                    while (reply := parser.gets()) is not False:
                        self._received(reply, unconfirmed, backoff)
                except hiredis.ProtocolError as e:
                    raise ConnectionError(f"unreadable reply from Redis: {e}") from e
        finally:
            self._connection = None
            await connection.disconnect(nowait=True)
            await pool.release(connection)

    def _received(self, reply: object, unconfirmed: set[str], backoff: Backoff) -> None:
        if isinstance(reply, ResponseError):  # the subscription was refused (an ACL user without the channel)
            raise reply
        if not isinstance(reply, list) or len(reply) != 3:
            return  # none of ours (a push notice of a newer Redis)
        kind, channel, data = reply
        if kind == "message":
            self._handlers[channel](data)
        elif kind == "subscribe" and unconfirmed:
            # Told only once Redis confirms every channel: from then on nothing is missed.
            unconfirmed.discard(channel)
            if not unconfirmed:
                backoff.reset()
                for subscriber in self._subscribers:
                    subscriber.subscribed()

    def _lost(self) -> None:
        for subscriber in self._subscribers:
            subscriber.lost()
