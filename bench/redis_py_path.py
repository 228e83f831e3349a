"""`gputorrent` with the scripts' Redis path through redis-py's public API instead of `gputorrent/pipelined.py`.

What would replace the project's layer if the rule of docs/benchmarks.md ("The Redis path") said it
must go: each script call is `Redis.execute_command` (redis-py's pool, its packer, its reply
parsing with hiredis), several commands sent together a `pipeline(transaction=False)`, and a
blocking send (the worker's doorbell and take, a followed stream) a connection of the pool held
for the send, read with a timeout that covers the block (and `INFO`, whose text the caller parses,
the same way). `bench/redis_path.py` runs a pool this
way beside one on the project's layer, in the same run.

    python bench/redis_py_path.py [gputorrent's arguments]    # as `python -m gputorrent ...`
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Argument = str | bytes | int
DEFAULT_TIMEOUT_S = 30.0  # as pipelined.py: a client without a socket timeout still gives up on a lost reply


class RedisPyPath:
    """The shared path's face (`execute`, `execute_all`) on redis-py's client."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def execute(self, *args: Argument) -> Any:
        if str(args[0]).upper() == "INFO":  # the caller parses INFO's text; redis-py's callback would make a dict
            (reply,) = await _raw(self._redis, [args], 0.0)
            return reply
        return await self._redis.execute_command(*args)

    async def execute_all(self, *commands: Sequence[Argument], blocks_s: float = 0.0) -> list[Any]:
        if blocks_s:
            return await _raw(self._redis, commands, blocks_s)
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()


async def _raw(redis: Redis, commands: Sequence[Sequence[Argument]], blocks_s: float) -> list[Any]:
    """Commands on a connection of the pool held meanwhile, their replies as Redis sent them (no
    callback), the first allowed to block up to `blocks_s`; the first error reply raises once every
    reply is read (as `pipeline.execute` does)."""
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.send_packed_command(connection.pack_commands(commands))
        timeout_s = float(pool.connection_kwargs.get("socket_timeout") or DEFAULT_TIMEOUT_S) + blocks_s
        replies: list[Any] = []
        # redis-py's read_response(timeout=...) answers None when its time runs out, like a blocking
        # pop that found nothing: bound the reads ourselves, below its bound, so a None is a reply and a
        # late reply is never taken for the next command's (the except below drops the connection).
        async with asyncio.timeout(timeout_s):
            for _ in commands:
                try:
                    replies.append(await connection.read_response(timeout=timeout_s + 1.0))
                except ResponseError as e:
                    replies.append(e)
    except TimeoutError as e:
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError(f"no reply from Redis within {timeout_s:g} s") from e
    except BaseException:
        await connection.disconnect(nowait=True)  # a reply left unread would go to the next borrower
        raise
    finally:
        await pool.release(connection)
    if errors := [reply for reply in replies if isinstance(reply, ResponseError)]:
        raise errors[0]
    return replies


@contextlib.asynccontextmanager
async def borrowed(redis: Redis) -> AsyncIterator[RedisPyPath]:
    yield RedisPyPath(redis)


def main() -> int:
    from gputorrent import pipelined, scripts
    from gputorrent.cli import main as gputorrent_main

    pipelined.pipelined = scripts.pipelined = RedisPyPath  # type: ignore[assignment]
    pipelined.borrowed = borrowed  # type: ignore[assignment]
    sys.argv[0] = "gputorrent"
    return gputorrent_main()


if __name__ == "__main__":
    raise SystemExit(main())
