"""Acknowledged writes: an admission and a stored result reach a replica before they are acknowledged.

Redis replicates asynchronously: a write the primary acknowledged and died before sending on is
gone after a failover. `WAIT N TIMEOUT_MS` answers once N replicas have every write made earlier on
the same connection, or once the bound passes, with the number that have. So a write that must
survive a failover is sent with its `WAIT` in one send (`run`), on a connection of its own
(`pipelined.borrowed`): Redis holds a connection in `WAIT` until the replicas answer, and every
command queued behind it on the hot path's shared connection would wait too.

How many replicas, per client (`configure`, from `GPUTORRENT_WAIT_REPLICAS`):

- `auto` (the default): one while the primary has a replica online, none on a lone Redis, which
  then gets no `WAIT` at all. The count (`INFO replication`, the replicas whose state is `online`) is
  read at most once a second (`REFRESH_S`), and again at once after a `WAIT` came short or a write
  lost its connection (a failover, say). A Redis user that may not run `INFO` counts none, with a
  warning.
- a number: that many, always; 0 sends no `WAIT`.

A `WAIT` that comes short leaves the write done on the primary (nothing rolls it back): the write is
acknowledged all the same, counted by kind (`unreplicated`, exported by the coordinator's
`/metrics`) and logged at most once per `WARN_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import weakref
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError, NoPermissionError, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gputorrent import pipelined
from gputorrent.scripts import Script

log = logging.getLogger(__name__)

AUTO: Literal["auto"] = "auto"
REFRESH_S = 1.0  # how old `auto`'s replica count may be
WARN_INTERVAL_S = 10.0  # at most one warning this often about writes acknowledged short of replicas
Write = Literal["admission", "result"]

# Writes acknowledged by fewer replicas than wanted within the bound, by kind, in this process.
unreplicated: collections.Counter[Write] = collections.Counter()


def parse_replicas(value: object) -> int | Literal["auto"]:
    """`GPUTORRENT_WAIT_REPLICAS`: `auto` or a whole number from 0.

    >>> parse_replicas("AUTO"), parse_replicas(" 2 ")
    ('auto', 2)
    """
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if not text.isdigit():
        raise ValueError(f"must be 'auto' or a whole number of replicas from 0, not {value!r}")
    return int(text)


class ReplicaWait:
    """What one client's acknowledged writes wait for; made by `configure`."""

    def __init__(self, redis: Redis, replicas: int | Literal["auto"], timeout_ms: int) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._redis = redis
        self._refused_info = False
        self._online = 0
        self._read_at = -math.inf
        self._reading = asyncio.Lock()
        self._short_since_warning = 0
        self._warned_at = -math.inf

    async def wanted(self) -> int:
        """How many replicas the next write waits for."""
        if isinstance(self.replicas, int):
            return self.replicas
        if time.monotonic() - self._read_at > REFRESH_S:
            async with self._reading:  # concurrent writers share one read
                if time.monotonic() - self._read_at > REFRESH_S:
                    self._online = await self._replicas_online()
                    self._read_at = time.monotonic()
        return min(1, self._online)

    async def _replicas_online(self) -> int:
        try:
            info = await pipelined.pipelined(self._redis).execute("INFO", "replication")
        except NoPermissionError:
            if not self._refused_info:
                log.warning(
                    "GPUTORRENT_WAIT_REPLICAS=auto cannot count the replicas: this Redis user may not run INFO "
                    "(grant +info, or set GPUTORRENT_WAIT_REPLICAS to a number); writes wait for no replica"
                )
                self._refused_info = True
            return 0
        text = info.decode() if isinstance(info, bytes) else str(info)
        return sum(1 for line in text.splitlines() if line.startswith("slave") and "state=online" in line)

    def forget(self) -> None:
        """The count may be wrong now (a short `WAIT`, a lost connection): read it before the next write."""
        self._read_at = -math.inf

    def acknowledged(self, write: Write, replicas: int, wanted: int, request_id: str) -> None:
        if replicas >= wanted:
            return
        unreplicated[write] += 1
        self.forget()
        self._short_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL_S:
            log.warning(
                "%d writes acknowledged with fewer replicas than wanted since the last warning (the latest: the %s "
                "of request %s, %d of %d replicas within %d ms): they are on the primary, and lost if it dies "
                "before a replica has them",
                self._short_since_warning, write, request_id, replicas, wanted, self.timeout_ms,
            )  # fmt: skip
            self._short_since_warning, self._warned_at = 0, now


_waits: weakref.WeakKeyDictionary[Redis, ReplicaWait] = weakref.WeakKeyDictionary()


def configure(redis: Redis, replicas: int | Literal["auto"], timeout_ms: int) -> None:
    """Make `redis`'s admissions and stored results wait for `replicas` (or `auto`) up to `timeout_ms`.
    A client never configured waits for none (tools, tests)."""
    _waits[redis] = ReplicaWait(redis, replicas, timeout_ms)


async def run(redis: Redis, write: Write, request_id: str, script: Script, numkeys: int, *args: str | bytes) -> Any:
    """The reply of `script`, once the replicas wanted have its writes or the bound passed."""
    waiting = _waits.get(redis)
    wanted = await waiting.wanted() if waiting is not None else 0
    if waiting is None or wanted == 0:
        return await script.run(redis, numkeys, *args)
    wait = ("WAIT", wanted, waiting.timeout_ms)
    try:
        async with pipelined.borrowed(redis) as connection:
            try:
                reply, replicas = await connection.execute_all(
                    ("EVALSHA", script.sha, numkeys, *args), wait, blocks_s=waiting.timeout_ms / 1000
                )
            except NoScriptError:  # a new or restarted Redis: the script did not run, the WAIT returned at once
                reply, replicas = await connection.execute_all(
                    ("EVAL", script.source, numkeys, *args), wait, blocks_s=waiting.timeout_ms / 1000
                )
    except (ConnectionError, RedisTimeoutError):
        waiting.forget()  # maybe another primary next time
        raise
    waiting.acknowledged(write, int(replicas), wanted, request_id)
    return reply
