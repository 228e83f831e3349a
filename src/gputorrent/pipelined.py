"""Commands on the hot path, sent on one connection that concurrent callers share.

redis-py spends about 90 µs of Python per command on this machine (its pool's bookkeeping, timeouts
around each read and write, a Python packer that copies the growing buffer per argument) where the
round trip itself costs about 10. Every request runs several Lua scripts (admission, take, finish),
so `Script.run` goes through a `PipelinedConnection` instead: a command is packed in C (hiredis) and
written at once, and its reply is read in the order Redis answers a connection's commands, by
whichever caller reads first. Concurrent callers therefore pipeline on one connection.

The connection is made and authenticated by the client's own pool (TLS, ACL users, the database,
its timeouts: all as configured there), taken out of it for good; closing the client closes it.
Only for commands Redis answers at once: nothing blocking, no pub/sub.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, DataError, NoPermissionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

READ_SIZE = 64 * 1024
DEFAULT_TIMEOUT_S = 30.0  # when the client sets no socket timeout: a lost reply must not hang its callers


class PipelinedConnection:
    """One connection of `redis`'s pool, shared: `await execute("EVALSHA", sha, 2, ...)`."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        kwargs = redis.connection_pool.connection_kwargs
        self._timeout_s = float(kwargs.get("socket_timeout") or DEFAULT_TIMEOUT_S)
        self._decode = bool(kwargs.get("decode_responses"))
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: str | bytes | int) -> Any:
        """The reply of one command; a Redis error reply raises as redis-py raises it.

        Raises:
            ConnectionError | TimeoutError: (redis-py's) the connection failed or no reply came in
                the client's socket timeout; every command waiting on it fails, the next reconnects.
        """
        link = self._link
        if link is None or link.broken:
            link = await self._connect()
        try:
            packed = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub types a 1-tuple
        except TypeError as e:
            raise DataError(str(e)) from e
        reply = link.send(packed)
        await link.read_until(reply, self._timeout_s)
        result = reply.result()
        if isinstance(result, ResponseError):
            raise _typed(result)
        return result

    async def _connect(self) -> _Link:
        async with self._connecting:
            if self._link is None or self._link.broken:
                # Out of the pool until it breaks: closing the client (or its pool) disconnects it.
                pool = self._redis.connection_pool
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                self._link = _Link(pool, connection, self._decode)
            return self._link


class _Link:
    """One connection's life: the commands sent on it wait for their replies here, in order."""

    def __init__(self, pool: ConnectionPool, connection: AbstractConnection, decode: bool) -> None:
        self._pool = pool
        self._connection = connection
        self._parser = hiredis.Reader(replyError=ResponseError, encoding="utf-8" if decode else None)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._reading = asyncio.Lock()
        self.broken = False

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        writer = self._connection._writer  # the pool made and authenticated the connection; we only write
        if self.broken or writer is None:
            self._break(ConnectionError("the connection to Redis is closed"))
        else:
            writer.write(packed)
        return reply

    async def read_until(self, reply: asyncio.Future[Any], timeout_s: float) -> None:
        """Read replies, handing each to its caller, until `reply` has its own."""
        async with self._reading:
            while not reply.done():
                reader = self._connection._reader
                if reader is None:
                    self._break(ConnectionError("the connection to Redis is closed"))
                    return
                try:
                    async with asyncio.timeout(timeout_s):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    # A lost reply would hand every later one to the wrong caller: this link is done.
                    self._break(RedisTimeoutError(f"no reply from Redis within {timeout_s:g} s"))
                    return
                except OSError as e:
                    self._break(ConnectionError(f"the connection to Redis failed: {e}"))
                    return
                if not data:
                    self._break(ConnectionError("Redis closed the connection"))
                    return
                self._parser.feed(data)
                while (parsed := self._parser.gets()) is not False:
                    waiting = self._waiting.popleft()
                    if not waiting.done():  # a cancelled caller's reply is dropped
                        waiting.set_result(parsed)

    def _break(self, error: Exception) -> None:
        """Fail every command waiting here and give the connection back to its pool, closed."""
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.done():
                waiting.set_exception(error)
        if not self.broken:
            self.broken = True
            asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        await self._connection.disconnect(nowait=True)
        await self._pool.release(self._connection)


def _typed(error: ResponseError) -> ResponseError:
    """The error class redis-py would raise for this reply (those the project tells apart)."""
    message = str(error)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("NOPERM"):
        return NoPermissionError(message)
    return error


_shared: weakref.WeakKeyDictionary[Redis, PipelinedConnection] = weakref.WeakKeyDictionary()


def pipelined(redis: Redis) -> PipelinedConnection:
    """The shared connection of the client `redis` (made on its first command)."""
    connection = _shared.get(redis)
    if connection is None:
        connection = _shared[redis] = PipelinedConnection(redis)
    return connection
