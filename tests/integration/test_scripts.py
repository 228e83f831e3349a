"""Scripts run by their SHA1, and load themselves again on a server that lost them."""

from __future__ import annotations

from redis.asyncio import Redis

from gputorrent.scripts import Script


async def test_a_script_runs_again_after_the_server_forgot_it(redis: Redis) -> None:
    add = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await add.run(redis, 1, "counter", "2") == 2
    assert await redis.script_exists(add.sha) == [True]  # loaded: later calls send only the SHA1
    await redis.script_flush()  # as after a restart
    assert await add.run(redis, 1, "counter", "3") == 5
