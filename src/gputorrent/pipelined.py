"""Commands on the hot path, sent on one connection that concurrent callers share.

redis-py spends about 90 µs of Python per command on this machine (its pool's bookkeeping, timeouts
around each read and write, a Python packer that copies the growing buffer per argument) where the
round trip itself costs about 10. Every request runs several Lua scripts (admission, take, finish),
so `Script.run` goes through a `PipelinedConnection` instead: a command is packed in C (hiredis) and
written at once, and its reply is read in the order Redis answers a connection's commands, by
whichever caller reads first. Concurrent callers therefore pipeline on one connection.

The connection is made and authenticated by the client's own pool (TLS, ACL users, the database,
its timeouts: all as configured there), taken out of it for good; closing the client closes it.
The shared connection (`pipelined`) is only for commands Redis answers at once; a blocking one (the
worker's doorbell) takes a connection of its own (`borrowed`). On a Redis Cluster each hash slot (a
cell of the pool: `keys.py`) has its own, made by the cluster client's node that serves the slot, so
every call names a key of its slot; a send that a node refused whole, without running any of it, is
sent again until the slot is served (`REDIRECT_WAIT_S`), and a `MOVED` makes the cluster client read
the slot map again.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import (
    ConnectionError,
    DataError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

Argument = str | bytes | int
READ_SIZE = 64 * 1024
# Replies of a server demoted from primary to replica: to a write, and to a command it was blocked in.
_DEMOTED = ("READONLY", "UNBLOCKED")
# Replies of a Redis Cluster node to a command it did not run (redis_client.py): the slot is moving
# (ASK, TRYAGAIN: sent again on the same connection, after a pause), or served elsewhere now or by
# nobody yet (MOVED, CLUSTERDOWN: sent again on a new connection, which asks the cluster anew).
_REDIRECTED = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
_NOT_SERVED_HERE = ("MOVED", "CLUSTERDOWN")
REDIRECT_WAIT_S = 15.0  # how long a redirected command is sent again before it fails
_REDIRECT_PAUSE_S = (0.01, 0.5)  # the first pause before sending again, and the longest
DEFAULT_TIMEOUT_S = 30.0  # when the client sets no socket timeout: a lost reply must not hang its callers
# Idle borrowed connections kept per client for the next blocking reader; one given back beyond
# that is closed, so a burst of followed streams does not hold its Redis connections for good.
MAX_IDLE_BORROWED = 16

Client: TypeAlias = Redis | RedisCluster
SlotKey = str | bytes | None  # a key of the slot a call is for; None (one Redis: any) only off a cluster


class PipelinedConnection:
    """One connection of `redis`'s pool, shared: `await execute("EVALSHA", sha, 2, ...)`; on a Redis
    Cluster, one to the node that serves `slot`."""

    def __init__(self, redis: Client, slot: int | None = None) -> None:
        self._redis = redis
        self._slot = slot
        self._read_slots_again = False  # a node refused the slot: the cluster client's map is out of date
        if isinstance(redis, RedisCluster):
            kwargs = redis.get_connection_kwargs()
        else:
            kwargs = redis.connection_pool.connection_kwargs
        self._timeout_s = float(kwargs.get("socket_timeout") or DEFAULT_TIMEOUT_S)
        self._decode = bool(kwargs.get("decode_responses"))
        self._link: _Link | None = None
        self._retired: set[_Link] = set()  # links to a node that no longer serves the cell, still read
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Argument) -> Any:
        """The reply of one command; a Redis error reply raises as redis-py raises it.

        Raises:
            ConnectionError | TimeoutError: (redis-py's) the connection failed or no reply came in
                the client's socket timeout; every command waiting on it fails, the next reconnects.
        """
        (reply,) = await self.execute_all(args)
        return reply

    async def execute_all(self, *commands: Sequence[Argument], blocks_s: float = 0.0) -> list[Any]:
        """The replies of several commands sent in one write; the first error reply raises (after
        every command ran). `blocks_s`: how long a blocking command among them may wait in Redis,
        on a connection of the caller's own (`borrowed`), added to the timeout for the replies.

        Commands a Redis Cluster node refused all of (`_REDIRECTED`: none of them ran; a `WAIT`
        among them writes nothing either way) are sent again, for up to `REDIRECT_WAIT_S`; where it
        refused only some, the others ran, and it raises `ConnectionError` as for a lost connection."""
        try:
            packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]
        except TypeError as e:
            raise DataError(str(e)) from e
        pause_s, give_up_at = _REDIRECT_PAUSE_S[0], asyncio.get_running_loop().time() + REDIRECT_WAIT_S
        while True:
            link, results = await self._send(packed, len(commands), blocks_s)
            redirected = [r for r in results if _redirect(r)]
            if not redirected:
                break
            if any(not _redirect(r) and not _writes_nothing(c) for c, r in zip(commands, results, strict=True)):
                raise ConnectionError(f"a Redis Cluster node ran only some of the commands sent: {redirected[0]}")
            if asyncio.get_running_loop().time() + pause_s > give_up_at:
                raise ConnectionError(f"the Redis Cluster did not serve the pool's cell in time: {redirected[0]}")
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, _REDIRECT_PAUSE_S[1])
        for result in results:
            if isinstance(result, ResponseError):
                if str(result).startswith(_DEMOTED):
                    # The server was a primary and is a replica now (a failover): every later command
                    # here would be refused too, so drop the link; the next one asks the pool (and so
                    # the Sentinels) for a connection to the new primary.
                    error = ConnectionError(f"the Redis server is no longer the primary: {result}")
                    link.abandon(error)
                    raise error
                raise _typed(result)
        return results

    async def _send(self, packed: bytes, commands: int, blocks_s: float) -> tuple[_Link, list[Any]]:
        link = self._link
        if link is None or link.broken:
            link = await self._connect()
        replies = link.send(packed, commands)
        await link.read_until(replies[-1], self._timeout_s + blocks_s)
        results = [reply.result() for reply in replies]
        if any(_redirect(r, _NOT_SERVED_HERE) for r in results):
            # This node does not serve the cell (now): new commands go to a new connection, which asks
            # the cluster where the cell is; this one closes once the replies sent on it are read.
            # (ASK and TRYAGAIN: the slot is still this node's while its keys move; the link stays.)
            if self._link is link:
                self._link = None
                self._retired.add(link)
                self._read_slots_again = True
            link.retired = True
        if link.retired and not link.waiting:
            link.close()
            self._retired.discard(link)
        return link, results

    def close(self) -> None:
        """Drop the connection now (commands still waiting on it fail); the next command makes a new one."""
        if self._link is not None:
            self._link.close()
        while self._retired:
            self._retired.pop().close()

    async def _connect(self) -> _Link:
        async with self._connecting:
            if self._link is None or self._link.broken:
                # Out of the pool until it breaks: closing the client (or its pool) disconnects it.
                redis = self._redis
                if isinstance(redis, RedisCluster):
                    # A link that broke may have lost its node (a primary died): read the slot map again.
                    self._read_slots_again |= self._link is not None
                    self._link = await self._connect_to_slot(redis)
                else:
                    pool = redis.connection_pool
                    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                    self._link = _Link(pool.release, connection, self._decode)
            return self._link

    async def _connect_to_slot(self, cluster: RedisCluster) -> _Link:
        assert self._slot is not None
        try:
            if self._read_slots_again:
                await cluster.nodes_manager.initialize()
                self._read_slots_again = False
            else:
                await cluster.initialize()  # nothing to do once the client has read the slot map
            node = cluster.nodes_manager.get_node_from_slot(self._slot)
        except RedisClusterException as e:  # not a RedisError: no node answered, or none serves the slot
            self._read_slots_again = True
            raise ConnectionError(f"the Redis Cluster cannot serve slot {self._slot} now: {e}") from e
        connection = node.acquire_connection()
        try:
            # A fresh socket: one idle in the node's pool may be dead (an idle timeout, a restart),
            # and every caller batched on this link would fail with it. A link lasts until it breaks.
            await connection.disconnect(nowait=True)
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            node.release(connection)
            self._read_slots_again = True
            raise

        async def release(connection: AbstractConnection) -> None:
            node.release(connection)  # type: ignore[arg-type]

        return _Link(release, connection, self._decode)


class _Link:
    """One connection's life: the commands sent on it wait for their replies here, in order."""

    def __init__(self, release: Callable[[Any], Awaitable[None]], connection: AbstractConnection, decode: bool) -> None:
        self._release = release  # gives the connection back to its pool (or the cluster's node)
        self._connection = connection
        self._parser = hiredis.Reader(replyError=ResponseError, encoding="utf-8" if decode else None)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._reading = asyncio.Lock()
        self.broken = False
        self.retired = False  # no new commands: closed once those sent have their replies

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def send(self, packed: bytes, commands: int) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(commands)]
        self._waiting.extend(replies)
        writer = self._connection._writer  # the pool made and authenticated the connection; we only write
        if self.broken or writer is None:
            self._break(ConnectionError("the connection to Redis is closed"))
        else:
            writer.write(packed)
        return replies

    def close(self) -> None:
        self._break(ConnectionError("the connection to Redis was closed by its owner"))

    def abandon(self, error: Exception) -> None:
        """Close the connection, failing the commands still waiting on it with `error`."""
        self._break(error)

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
                waiting.exception()  # a cancelled caller's is never looked at: not worth a log line
        if not self.broken:
            self.broken = True
            closing = asyncio.get_running_loop().create_task(self._close())
            _closing.add(closing)  # the loop keeps only a weak reference to a task
            closing.add_done_callback(_closing.discard)

    async def _close(self) -> None:
        await self._connection.disconnect(nowait=True)
        await self._release(self._connection)


def _redirect(reply: Any, kinds: tuple[str, ...] = _REDIRECTED) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith(kinds)


def _writes_nothing(command: Sequence[Argument]) -> bool:
    """A command with no key, which ran or not makes no difference: a `WAIT` sent after a script."""
    name = command[0]
    return (name.decode() if isinstance(name, bytes) else str(name)).upper() == "WAIT"


def _typed(error: ResponseError) -> ResponseError:
    """The error class redis-py would raise for this reply (those the project tells apart)."""
    message = str(error)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("NOPERM"):
        return NoPermissionError(message)
    return error


_shared: weakref.WeakKeyDictionary[Client, dict[int | None, PipelinedConnection]] = weakref.WeakKeyDictionary()
_closing: set[asyncio.Task[None]] = set()
_idle: weakref.WeakKeyDictionary[Client, dict[int | None, list[PipelinedConnection]]] = weakref.WeakKeyDictionary()


def slot_of(redis: Client, key: SlotKey) -> int | None:
    """The hash slot of `key` on a Redis Cluster; None for one Redis (every key is on it)."""
    if not isinstance(redis, RedisCluster):
        return None
    if key is None:
        raise ValueError("a call on a Redis Cluster names a key of its slot")
    return key_slot(key.encode() if isinstance(key, str) else key)


def pipelined(redis: Client, key: SlotKey = None) -> PipelinedConnection:
    """The shared connection of the client `redis` (made on its first command), for the slot of `key`."""
    slot = slot_of(redis, key)
    by_slot = _shared.get(redis)
    if by_slot is None:
        by_slot = _shared[redis] = {}
    connection = by_slot.get(slot)
    if connection is None:
        connection = by_slot[slot] = PipelinedConnection(redis, slot)
    return connection


@contextlib.asynccontextmanager
async def borrowed(redis: Client, key: SlotKey = None) -> AsyncIterator[PipelinedConnection]:
    """A connection of the caller's own while the block runs, for a blocking command (the worker's
    doorbell) on the slot of `key`; up to `MAX_IDLE_BORROWED` idle ones are kept for the next borrower, the rest closed.
    A block left by an exception (a cancelled worker, say) closes it: Redis then drops the blocked
    command and whatever was sent after it, rather than run them for nobody."""
    slot = slot_of(redis, key)
    idle = _idle.setdefault(redis, {}).setdefault(slot, [])
    connection = idle.pop() if idle else PipelinedConnection(redis, slot)
    drops = _drops.get(redis, 0)
    try:
        yield connection
    except BaseException:
        connection.close()
        raise
    finally:
        if _drops.get(redis, 0) != drops:  # borrowed while `drop` closed the others: it may reach the old primary
            connection.close()
        if len(idle) < _idle_max.get(redis, MAX_IDLE_BORROWED):
            idle.append(connection)  # a closed one reconnects on its next command
        else:
            connection.close()


def keep_idle_borrowed(redis: Client, count: int) -> None:
    """Keep up to `count` idle borrowed connections of `redis` a slot, not `MAX_IDLE_BORROWED`: for a process
    whose thousands of consumers share one client (the simulated workers), each blocking in turn."""
    _idle_max[redis] = count


_idle_max: weakref.WeakKeyDictionary[Client, int] = weakref.WeakKeyDictionary()
_drops: weakref.WeakKeyDictionary[Client, int] = weakref.WeakKeyDictionary()  # how often `drop` ran, by client


def drop(redis: Client) -> None:
    """Close the shared connections and the idle borrowed ones of `redis` (the primary they reach is
    being replaced); each reconnects, through the pool, on its next command. One borrowed now is closed
    when it is given back."""
    _drops[redis] = _drops.get(redis, 0) + 1
    for shared in _shared.get(redis, {}).values():
        shared.close()
    for idle in _idle.get(redis, {}).values():
        for connection in idle:
            connection.close()
