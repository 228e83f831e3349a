"""The hot path's shared connection (`pipelined.py`): concurrent callers each get their own reply,
and no failure can hand one caller another's reply."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from gputorrent import redis_client
from gputorrent.pipelined import MAX_IDLE_BORROWED, PipelinedConnection, borrowed, pipelined
from tests.conftest import eventually


async def test_concurrent_callers_each_get_their_own_reply(redis: Redis) -> None:
    connection = pipelined(redis)
    replies = await asyncio.gather(*(connection.execute("ECHO", f"caller-{i}") for i in range(300)))
    assert replies == [f"caller-{i}" for i in range(300)]
    assert pipelined(redis) is connection  # one per client


async def test_error_replies_raise_as_redis_py_raises_them(redis: Redis) -> None:
    connection = pipelined(redis)
    await redis.set("text", "not a number")
    with pytest.raises(ResponseError, match="not an integer"):
        await connection.execute("INCR", "text")
    with pytest.raises(NoScriptError):
        await connection.execute("EVALSHA", "0" * 40, 0)
    assert await connection.execute("INCRBY", "count", 2) == 2  # and the connection goes on


async def test_a_cancelled_callers_reply_goes_to_nobody(redis: Redis) -> None:
    connection = pipelined(redis)
    slow = asyncio.create_task(connection.execute("BLPOP", "nothing-here", "0.3"))  # its reply comes late
    await asyncio.sleep(0)  # it has sent its command
    slow.cancel()
    assert await connection.execute("ECHO", "mine") == "mine"  # not the BLPOP's nil


async def test_a_lost_reply_fails_the_waiting_commands_and_the_next_one_reconnects(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.2)
    connection = PipelinedConnection(client)
    try:
        stalled = asyncio.create_task(connection.execute("BLPOP", "nothing-here", "1"))  # no reply within 0.2 s
        queued_behind = asyncio.create_task(connection.execute("ECHO", "behind"))
        with pytest.raises(TimeoutError):
            await stalled
        with pytest.raises(TimeoutError):
            await queued_behind  # its reply would have been the BLPOP's: it fails instead
        assert await connection.execute("ECHO", "after") == "after"
    finally:
        await client.aclose()


async def test_a_connection_closed_by_redis_fails_once_then_reconnects(redis: Redis) -> None:
    connection = pipelined(redis)
    await connection.execute("CLIENT", "SETNAME", "pipelined-under-test")
    assert await redis.client_kill_filter(_type="normal", skipme=True) >= 1
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(await connection.execute("ECHO", "again"))
        except ConnectionError:
            outcomes.append("failed")
    assert outcomes[-1] == "again" and outcomes.count("failed") <= 1, outcomes


async def _blocked_clients(redis: Redis) -> int:
    return sum(1 for client in await redis.client_list() if client.get("cmd") == "blpop")


async def test_a_cancelled_blocking_borrower_leaves_nothing_to_run_for_nobody(redis: Redis) -> None:
    async def wait_then_take() -> None:
        async with borrowed(redis) as connection:  # as the worker waits on its doorbell, then takes
            await connection.execute_all(("BLPOP", "bell", "5"), ("LPUSH", "taken", "job"), blocks_s=5)

    waiting = asyncio.create_task(wait_then_take())

    async def blocked() -> bool:
        return await _blocked_clients(redis) == 1

    await eventually(blocked, "the borrower to block on the doorbell")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    async def gone() -> bool:
        return await _blocked_clients(redis) == 0

    await eventually(gone, "its connection to close")
    await redis.lpush("bell", "ring")
    assert await redis.llen("bell") == 1  # nobody popped it
    assert await redis.llen("taken") == 0  # and what was sent after the pop never ran
    async with borrowed(redis) as connection:  # the next borrower gets a working connection
        assert await connection.execute_all(("BLPOP", "bell", "1"), ("ECHO", "x"), blocks_s=1) == [
            ["bell", "ring"],
            "x",
        ]


async def test_borrowed_connections_beyond_the_idle_bound_are_closed_when_given_back(redis: Redis) -> None:
    """A burst of blocking readers (streams followed at once) does not keep its connections open for good."""
    everyone_in = asyncio.Event()
    inside = 0

    async def follower(i: int) -> None:
        nonlocal inside
        async with borrowed(redis) as connection:
            assert await connection.execute("ECHO", f"follower-{i}") == f"follower-{i}"
            inside += 1
            if inside == MAX_IDLE_BORROWED * 2:
                everyone_in.set()
            await everyone_in.wait()  # all of them hold a connection at once

    before = len(await redis.client_list())
    await asyncio.wait_for(asyncio.gather(*(follower(i) for i in range(MAX_IDLE_BORROWED * 2))), timeout=10)

    async def open_connections() -> bool:
        return len(await redis.client_list()) == before + MAX_IDLE_BORROWED

    await eventually(open_connections, "the connections beyond the bound to close")
    async with borrowed(redis) as connection:  # a kept one serves the next borrower
        assert await connection.execute("ECHO", "next") == "next"


async def test_an_unbounded_client_blocks_on_more_connections_at_once_than_redis_pys_default_bound(
    redis_url: str,
) -> None:
    """A worker's job slots each block on a connection of their own while they wait for a job; redis-py
    bounds a pool at 100 by default, which failed every take past it as if Redis were unreachable."""
    client = redis_client.async_client(redis_url)
    waiting = 150

    async def block_once(i: int) -> object:
        async with borrowed(client) as connection:
            return await connection.execute_all(("BLPOP", f"nothing-{i}", "0.2"), blocks_s=0.2)

    try:
        assert await asyncio.gather(*(block_once(i) for i in range(waiting))) == [[None]] * waiting
    finally:
        await client.aclose()
