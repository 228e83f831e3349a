"""Acknowledged writes: an admission and a stored result reach a replica before they are acknowledged.

Redis replicates asynchronously: a write the primary acknowledged and died before sending on is
gone after a failover. `WAIT N TIMEOUT_MS` answers once N replicas have every write made earlier on
the same connection, or once the bound passes, with the number that have. So a write that must
survive a failover is sent with its `WAIT` in one send (`run`), on a connection of its own
(`pipelined.borrowed`): Redis holds a connection in `WAIT` until the replicas answer, and every
command queued behind it on the hot path's shared connection would wait too.

How many replicas, per client (`configure`, from `GPUTORRENT_WAIT_REPLICAS`):

- `auto` (the default): one on a Redis found through Sentinel, always (a primary that Sentinel has
  just replaced has no replica left, and what it takes then is lost when it rejoins as a replica: a
  count of the replicas online would let exactly those writes through unchecked). On a plain URL:
  one while the primary has a replica online, none on a lone Redis, which then gets no `WAIT` at
  all. The count (`INFO replication`, the replicas whose state is `online`) is read at most once a
  second (`REFRESH_S`), and again at once after a `WAIT` came short or a write lost its connection.
  A Redis user that may not run `INFO` counts none, with a warning.
- a number: that many, always; 0 sends no `WAIT`.

A `WAIT` that comes short leaves the write done on the primary (nothing rolls it back), but it is not
acknowledged: `Unreplicated` is raised (a `RedisError`, so callers treat it as Redis not ready: the
coordinator answers 503 and the client retries with the same request id, a worker keeps the result
and stores it again). It is counted by kind (`unreplicated`, exported by the coordinator's `/metrics`)
and logged at most once per `WARN_INTERVAL_S`. A retry finds the write done and touches it again
(`confirm`, or the write's own script), so its `WAIT` covers it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import ConnectionError, NoPermissionError, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gputorrent import keys, pipelined, redis_client
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import ArgsT, KeysT, NoArgs, Script

log = logging.getLogger(__name__)

AUTO: Literal["auto"] = "auto"
REFRESH_S = 1.0  # how old `auto`'s replica count may be
WARN_INTERVAL_S = 10.0  # at most one warning this often about writes acknowledged short of replicas
Write = Literal["admission", "result"]

# Writes that fewer replicas than wanted acknowledged within the bound, by kind, in this process.
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


class Unreplicated(RedisError):
    """A write the primary made, which fewer replicas than wanted had within the bound: not acknowledged."""

    def __init__(self, write: Write, request_id: str, replicas: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(
            f"the {write} of request {request_id} reached {replicas} of the {wanted} replicas wanted within "
            f"{timeout_ms} ms (GPUTORRENT_WAIT_TIMEOUT_MS)"
        )
        self.write = write
        self.request_id = request_id


class StalePrimary(RedisError):
    """The server the client writes to is no longer the primary the Sentinels name, or is being failed
    over: nothing is written (the client's connections are dropped, so the next ones go to the new one)."""


class ReplicaWait:
    """What one client's acknowledged writes wait for; made by `configure`."""

    def __init__(self, redis: RedisClient, replicas: int | Literal["auto"], timeout_ms: int) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._redis = redis
        self._sentinel = redis_client.finds_primary_through_sentinel(redis)
        self._refused_info = False
        self._run_id = ""  # the primary the count was read from (`INFO server`)
        self._online = 0  # its replicas online at the last read
        self._expected = 0  # how many of them a write waits for (`auto`)
        self._read_at = -math.inf
        self._reading = asyncio.Lock()
        self._short_since_warning = 0
        self._warned_at = -math.inf

    async def wanted(self) -> int:
        """How many replicas the next write waits for.

        Raises:
            StalePrimary: the primary lost replicas and the Sentinels do not confirm it (they name
                another, or fail it over): what it took now would be lost when it rejoins as a replica.
        """
        if isinstance(self.replicas, int):
            return self.replicas
        if time.monotonic() - self._read_at > REFRESH_S:
            async with self._reading:  # concurrent writers share one read
                if time.monotonic() - self._read_at > REFRESH_S:
                    await self._read()
        return self._expected

    async def _read(self) -> None:
        run_id, online = await self._primary_state()
        if run_id != self._run_id or online > self._online or not self._sentinel:
            # Another primary (after a failover), more replicas, or no Sentinel to ask: take the count.
            self._run_id, self._online = run_id, online
            self._expected = online if self._sentinel else min(1, online)
        elif online < self._online:
            # Replicas left this primary: one died, or they follow another primary now (a failover),
            # and then this one's writes will be gone. Only the Sentinels tell which.
            await self._confirm_primary(f"its replicas online fell from {self._online} to {online}")
            self._online = self._expected = online
        self._read_at = time.monotonic()

    async def _confirm_primary(self, why: str) -> None:
        if not await redis_client.still_primary(self._redis, self._run_id):
            self.forget()
            await redis_client.reconnect(self._redis)
            raise StalePrimary(
                f"the Redis primary is being replaced ({why}; the Sentinels name another, or fail it over)"
            )

    async def _primary_state(self) -> tuple[str, int]:
        """The primary's run id and its replicas online (`INFO server replication`)."""
        try:
            # On a cluster: the primary of cell 0's slot (the pool's home keys), taken to speak for all.
            home = keys.worker_index()
            info = await pipelined.pipelined(self._redis, home).execute("INFO", "server", "replication")
        except NoPermissionError:
            if not self._refused_info:
                log.warning(
                    "GPUTORRENT_WAIT_REPLICAS=auto cannot count the replicas: this Redis user may not run INFO "
                    "(grant +info, or set GPUTORRENT_WAIT_REPLICAS to a number); writes wait for no replica"
                )
                self._refused_info = True
            return "", 0
        text = info.decode() if isinstance(info, bytes) else str(info)
        run_id = next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("run_id:")), "")
        online = sum(1 for line in text.splitlines() if line.startswith("slave") and "state=online" in line)
        return run_id, online

    def forget(self) -> None:
        """The count may be wrong now (a short `WAIT`, a lost connection): read it before the next write."""
        self._read_at = -math.inf

    async def check(self, write: Write, replicas: int, wanted: int, request_id: str) -> None:
        """Raise `Unreplicated` when `replicas` came short of `wanted`; with Sentinel and `auto`, a write
        that reached some replicas but not all is acknowledged once the Sentinels confirm this primary
        (a replica left it: later writes wait for as many), else `StalePrimary` is raised."""
        if replicas >= wanted:
            return
        self.forget()
        if self._sentinel and self.replicas == AUTO and replicas >= 1:
            await self._confirm_primary(f"{replicas} of its {wanted} replicas acknowledged within {self.timeout_ms} ms")
            self._expected = replicas
            return
        unreplicated[write] += 1
        self._short_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL_S:
            log.warning(
                "%d writes not acknowledged since the last warning: fewer replicas than wanted had them in time (the "
                "latest: the %s of request %s, %d of %d replicas within %d ms); each is retried by its client",
                self._short_since_warning, write, request_id, replicas, wanted, self.timeout_ms,
            )  # fmt: skip
            self._short_since_warning, self._warned_at = 0, now
        raise Unreplicated(write, request_id, replicas, wanted, self.timeout_ms)


_waits: weakref.WeakKeyDictionary[RedisClient, ReplicaWait] = weakref.WeakKeyDictionary()


def configure(redis: RedisClient, replicas: int | Literal["auto"], timeout_ms: int) -> None:
    """Make `redis`'s admissions and stored results wait for `replicas` (or `auto`) up to `timeout_ms`.
    A client never configured waits for none (tools, tests)."""
    _waits[redis] = ReplicaWait(redis, replicas, timeout_ms)


async def run(
    redis: RedisClient, write: Write, request_id: str, script: Script[KeysT, ArgsT], keys: KeysT, args: ArgsT
) -> Any:
    """The reply of `script` over `keys` and `args`, once the replicas wanted have its writes.

    Raises:
        Unreplicated: the bound passed first; the script's writes are on the primary, unacknowledged.
    """
    waiting = _waits.get(redis)
    wanted = await waiting.wanted() if waiting is not None else 0
    if waiting is None or wanted == 0:
        return await script.run(redis, keys, args)
    numkeys, flat = script.call(keys, args)
    wait = ("WAIT", wanted, waiting.timeout_ms)
    try:
        async with pipelined.borrowed(redis, flat[0] if numkeys else None) as connection:
            try:
                reply, replicas = await connection.execute_all(
                    ("EVALSHA", script.sha, numkeys, *flat), wait, blocks_s=waiting.timeout_ms / 1000
                )
            except NoScriptError:  # a new or restarted Redis: the script did not run, the WAIT returned at once
                reply, replicas = await connection.execute_all(
                    ("EVAL", script.source, numkeys, *flat), wait, blocks_s=waiting.timeout_ms / 1000
                )
    except (ConnectionError, RedisTimeoutError):
        waiting.forget()  # maybe another primary next time
        raise
    await waiting.check(write, int(replicas), wanted, request_id)
    return reply


# Rewrites a key with its own value and time to live: a write, so a `WAIT` sent after it covers every
# earlier write to the primary too (replication is one ordered stream), whichever connection made them.
@dataclass(frozen=True)
class _TouchKeys:
    key: str


_TOUCH = Script(
    _TouchKeys,
    NoArgs,
    """
local value = redis.call('GET', key)
if value then redis.call('SET', key, value, 'KEEPTTL') end
return value
""",
)


async def confirm(redis: RedisClient, write: Write, request_id: str, key: str) -> Any:
    """The value of `key` (None when it is gone), once the replicas wanted have it and everything
    written before it: for a repeat that finds an earlier write done, whose own `WAIT` may have come short.

    Raises:
        Unreplicated: the bound passed first.
    """
    return await run(redis, write, request_id, _TOUCH, _TouchKeys(key), NoArgs())
