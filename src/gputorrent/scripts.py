"""Lua scripts run by their SHA1: every job's path runs several, and sending each one's source
(kilobytes) with every call cost more than the call itself, on both sides of the connection."""

from __future__ import annotations

import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gputorrent.pipelined import pipelined


class Script:
    """A Lua script: `await script.run(redis, numkeys, *keys_and_args)` (the arguments of `EVAL`)
    runs it by its SHA1 (`EVALSHA`), loading it with `EVAL` the first time a server has not seen
    it (a new or restarted Redis)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, redis: Redis, numkeys: int, *keys_and_args: str | bytes) -> Any:
        connection = pipelined(redis)  # the hot path's connection: see pipelined.py
        try:
            return await connection.execute("EVALSHA", self.sha, numkeys, *keys_and_args)
        except NoScriptError:
            return await connection.execute("EVAL", self.source, numkeys, *keys_and_args)
