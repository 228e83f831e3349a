"""The pool's catalogue of model files, in Redis, for the swarm that moves them (gputorrent/swarm.py).

A llama.cpp worker publishes the file of every model it serves when it registers: its name, size,
SHA-256 and v2 torrent (`SwarmFile`), under the model's name. The first file published for a name
is the one the pool serves under it: another file under that name is refused (two files would give
two answers to one request, and break the exact replay of a stream on another worker).

Who holds a file is not stored apart: it is every live worker that registered a swarm address and
serves the model (a llama.cpp worker serves only files it holds). So a worker that dies or leaves
stops being a holder with its heartbeat, and one that fetched a model holds it once it lists it.

Who may talk to whom: a worker's swarm accepts connections only from `members`, the addresses of
live workers with a swarm address and of the fetches under way (a worker fetches before it
registers: it has nothing to serve yet). A fetch is announced with the join key
(`POST /swarm/fetch`), and lapses after `FETCH_LAPSE_S` unless announced again. Each change bumps
`swarm:epoch`, which every beat's answer carries, so workers read the members again only then.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from gputorrent import keys
from gputorrent.protocol import (
    SwarmFile,
    SwarmMembers,
    SwarmPeer,
    SwarmProgress,
    SwarmSource,
    SwarmTransfer,
    WorkerState,
)
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script

FETCH_LAPSE_S = 600  # an announced fetch counts this long; a fetch still waiting announces itself again
TRANSFER_STALE_S = 30.0  # a fetch whose progress has not come for this long is not shown (its worker died)


class Conflict(Exception):
    """The catalogue has another file under this model name."""

    def __init__(self, model: str, published: SwarmFile, offered: SwarmFile) -> None:
        super().__init__(
            f"the pool's catalogue has another file as {model!r} (SHA-256 {published.sha256[:12]}…, this worker's "
            f"is {offered.sha256[:12]}…); serve this file under another model name"
        )
        self.model = model


async def publish(redis: RedisClient, files: dict[str, SwarmFile]) -> None:
    """Add each model's file to the catalogue where the name is new.

    Raises:
        Conflict: a name already stands for another file (HSETNX kept the first of two published at once).
    """
    if not files:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for model, offered in files.items():
            pipe.hsetnx(keys.catalogue(), model, offered.model_dump_json())
        pipe.hmget(keys.catalogue(), list(files))
        *_, stored = await pipe.execute()
    for (model, offered), raw in zip(files.items(), stored, strict=True):
        if (published := SwarmFile.model_validate_json(raw)).sha256 != offered.sha256:
            raise Conflict(model, published, offered)


async def has(redis: RedisClient, model: str) -> bool:
    return bool(await redis.hexists(keys.catalogue(), model))


async def forget(redis: RedisClient, model: str) -> bool:
    """Remove `model` from the catalogue (an admin frees a name); False when it was not there. Workers
    that hold its file keep it; one that registers again publishes it again."""
    return bool(await redis.hdel(keys.catalogue(), model))


async def entries(redis: RedisClient) -> dict[str, SwarmFile]:
    """Every model in the catalogue with its file."""
    stored = await redis.hgetall(keys.catalogue())
    return {str(model): SwarmFile.model_validate_json(raw) for model, raw in sorted(stored.items())}


def holders(model: str, workers: Sequence[WorkerState]) -> list[WorkerState]:
    """The live workers that seed `model`'s file."""
    return [w for w in workers if w.state != "dead" and w.swarm is not None and model in w.models]


async def announce_fetch(
    redis: RedisClient, model: str, peer: SwarmPeer, workers: Sequence[WorkerState]
) -> SwarmSource | None:
    """Note that the worker at `peer` fetches `model` (its holders connect to it) and say where from;
    None when the catalogue has no such model."""
    raw = await redis.hget(keys.catalogue(), model)
    if raw is None:
        return None
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.swarm_fetching(), {_fetching_member(model, peer): now + FETCH_LAPSE_S})
        pipe.incr(keys.swarm_epoch())
        await pipe.execute()
    sources = [w.swarm for w in holders(model, workers) if w.swarm is not None and w.swarm != peer]
    now_members = await members(redis, workers)
    return SwarmSource(
        file=SwarmFile.model_validate_json(raw), holders=sources,
        fetching=[other for other in now_members.fetching.get(model, []) if other != peer],
        members=now_members.members,
    )  # fmt: skip


async def fetch_done(redis: RedisClient, model: str, peer: SwarmPeer) -> None:
    """The fetch at `peer` ended (it holds the file now, or gave up)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(keys.swarm_fetching(), _fetching_member(model, peer))
        pipe.hdel(keys.swarm_transfers(), _fetching_member(model, peer))
        pipe.incr(keys.swarm_epoch())  # its address is let in no longer (unless it registered meanwhile)
        await pipe.execute()


async def report(redis: RedisClient, progress: SwarmProgress, workers: Sequence[WorkerState]) -> SwarmMembers:
    """Keep the last progress of a fetch still announced (for the dashboard) and answer the members,
    which it lets in."""
    now = time.time()
    await _REPORT.run(
        redis, _ReportKeys(fetching=keys.swarm_fetching(), transfers=keys.swarm_transfers()),
        _ReportArgs(member=_fetching_member(progress.model, progress.peer), lapse_at=str(now + FETCH_LAPSE_S),
                    transfer=SwarmTransfer(**progress.model_dump(), at=now).model_dump_json()),
    )  # fmt: skip
    return await members(redis, workers)


@dataclass(frozen=True)
class _ReportKeys:
    fetching: str
    transfers: str


@dataclass(frozen=True)
class _ReportArgs:
    member: str
    lapse_at: str
    transfer: str


# Only a fetch still announced: a report that was on its way while the fetch ended (the worker gave up
# waiting for its answer) lands after `fetch_done` and would show the fetch for `TRANSFER_STALE_S`.
_REPORT = Script(_ReportKeys, _ReportArgs, """
if not redis.call('ZSCORE', fetching, member) then return 0 end
redis.call('ZADD', fetching, 'XX', lapse_at, member)
redis.call('HSET', transfers, member, transfer)
return 1
""")  # fmt: skip


async def transfers(redis: RedisClient) -> list[SwarmTransfer]:
    """The fetches under way, by model; those whose progress stopped coming are dropped."""
    stored = await redis.hgetall(keys.swarm_transfers())
    now = time.time()
    current: list[SwarmTransfer] = []
    stale: list[str] = []
    for field, raw in stored.items():
        transfer = SwarmTransfer.model_validate_json(raw)
        if now - transfer.at < TRANSFER_STALE_S:
            current.append(transfer)
        else:
            stale.append(str(field))
    if stale:
        await redis.hdel(keys.swarm_transfers(), *stale)
    return sorted(current, key=lambda t: (t.model, t.peer.address, t.peer.port))


async def members(redis: RedisClient, workers: Sequence[WorkerState]) -> SwarmMembers:
    """The addresses of live workers with a swarm address and of fetches under way, and the fetches."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(keys.swarm_fetching(), "-inf", now)
        pipe.zrange(keys.swarm_fetching(), 0, -1)
        _, under_way = await pipe.execute()
    fetching: dict[str, list[SwarmPeer]] = {}
    for member in under_way:
        model, address, port = member.rsplit(" ", 2)
        fetching.setdefault(model, []).append(SwarmPeer(address=address, port=int(port)))
    addresses = {w.swarm.address for w in workers if w.state != "dead" and w.swarm is not None}
    addresses.update(peer.address for peers in fetching.values() for peer in peers)
    return SwarmMembers(members=sorted(addresses), fetching=fetching)


async def joined(redis: RedisClient) -> None:
    """A worker with a swarm address registered: the others let it in."""
    await redis.incr(keys.swarm_epoch())


def _fetching_member(model: str, peer: SwarmPeer) -> str:
    # A model name holds no whitespace (`MODEL_NAME_PATTERN`), and an address no space.
    return f"{model} {peer.address} {peer.port}"
