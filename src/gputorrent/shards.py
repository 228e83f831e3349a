"""Shard hosts in Redis: machines that lend the memory and compute of one `ggml-rpc-server` each to a
group, the workers that serve a model split over them and itself (`gputorrent worker --split`).

A shard host is alive while `shardbeat:{id}` exists (it beats as a worker does). A group holds a host
while `shardgroup:{id}` names it: the leader renews the lease while it runs, so a leader that dies
frees its hosts within `LEASE_S`. One host serves one group at a time: `ggml-rpc-server` serves one
client at a time, and two models would not fit in what it lends anyway.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from gputorrent import keys
from gputorrent.protocol import Shard, ShardAssign, ShardRegistration
from gputorrent.redis_client import RedisClient
from gputorrent.scripts import Script

LEASE_S = 30.0  # a group's hold on its hosts without a renewal (the leader renews every few seconds)


# Each step on a lease reads its holder and acts in one script: read and act apart, a lease that
# lapsed between them and went to another group would be extended or deleted for the wrong group.
@dataclass(frozen=True)
class _LeaseKeys:
    lease: str  # `shardgroup:{id}`
    beat: str  # `shardbeat:{id}`: the host is alive


@dataclass(frozen=True)
class _LeaseArgs:
    group: str
    lease_ms: int


# 1: the group holds it now (taken, or its own hold extended); 0: another group holds it.
_HOLD = Script(_LeaseKeys, _LeaseArgs, """
if redis.call('SET', lease, group, 'PX', lease_ms, 'NX') then return 1 end
if redis.call('GET', lease) == group then redis.call('PEXPIRE', lease, lease_ms) return 1 end
return 0
""")  # fmt: skip

# 1: the group's hold extended; 0: not its hold, or the host stopped beating (then the hold is let go).
_RENEW = Script(_LeaseKeys, _LeaseArgs, """
if redis.call('GET', lease) ~= group then return 0 end
if redis.call('EXISTS', beat) == 1 then redis.call('PEXPIRE', lease, lease_ms) return 1 end
redis.call('DEL', lease)
return 0
""")  # fmt: skip

# Lets go of the group's own hold only: one that lapsed and went to another group stays theirs.
_RELEASE = Script(_LeaseKeys, _LeaseArgs, """
if redis.call('GET', lease) == group then redis.call('DEL', lease) end
return 0
""")  # fmt: skip


def _lease(shard_id: str) -> _LeaseKeys:
    return _LeaseKeys(lease=keys.shard_group_key(shard_id), beat=keys.shard_beat_key(shard_id))


class NotEnoughShards(Exception):
    """The pool's free shard hosts cannot give what a group asks for; the message says what is missing."""


async def register(redis: RedisClient, registration: ShardRegistration, ttl_s: float) -> str:
    """Store the host (a new id unless it gives one) and mark it alive; its id."""
    shard_id = registration.shard_id or f"s-{uuid.uuid4().hex[:12]}"
    record = registration.model_copy(update={"shard_id": shard_id})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.shard_key(shard_id), record.model_dump_json())
        pipe.sadd(keys.shards(), shard_id)
        pipe.set(keys.shard_beat_key(shard_id), str(registration.memory_bytes), px=int(ttl_s * 1000))
        await pipe.execute()
    return shard_id


async def live_address(redis: RedisClient, shard_id: str) -> tuple[str, int] | None:
    """Where a live shard host of this id listens; None when there is none."""
    record, alive = await redis.mget(keys.shard_key(shard_id), keys.shard_beat_key(shard_id))
    if record is None or alive is None:
        return None
    registration = ShardRegistration.model_validate_json(record)
    return registration.address, registration.port


async def beat(redis: RedisClient, shard_id: str, memory_bytes: int, ttl_s: float) -> bool:
    """Keep the host alive with what it lends now; False when it is not registered (it registers again)."""
    if not await redis.exists(keys.shard_key(shard_id)):
        return False
    await redis.set(keys.shard_beat_key(shard_id), str(memory_bytes), px=int(ttl_s * 1000))
    return True


async def leave(redis: RedisClient, shard_id: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.shard_key(shard_id), keys.shard_beat_key(shard_id), keys.shard_group_key(shard_id))
        pipe.srem(keys.shards(), shard_id)
        await pipe.execute()


async def listing(redis: RedisClient) -> list[Shard]:
    """Every registered shard host, alive or not, with what it lends now and the group that holds it."""
    ids = sorted(str(shard_id) for shard_id in await redis.smembers(keys.shards()))
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for shard_id in ids:
            pipe.get(keys.shard_key(shard_id))
            pipe.get(keys.shard_beat_key(shard_id))
            pipe.get(keys.shard_group_key(shard_id))
        replies = await pipe.execute()
    shards = []
    for i in range(0, len(replies), 3):
        record, lent, group = replies[i : i + 3]
        if record is None:
            continue
        registration = ShardRegistration.model_validate_json(record)
        memory = int(lent) if lent is not None else registration.memory_bytes
        shards.append(
            Shard(
                **registration.model_dump(exclude={"shard_id", "memory_bytes"}),
                shard_id=str(registration.shard_id),
                memory_bytes=memory,
                alive=lent is not None,
                group=group,
            )
        )
    return shards


async def assign(redis: RedisClient, ask: ShardAssign) -> list[Shard]:
    """Hold shard hosts for `ask.group` and return them, the ones that lend most first: `ask.count` of
    them, or the fewest that lend `ask.memory_bytes` together. Hosts the group held and no longer
    gets are let go.

    Raises:
        NotEnoughShards: the free hosts (alive, of the same llama.cpp, held by no other group, not
            excluded) are too few, or lend too little; the message says how much is missing.
    """
    every = await listing(redis)
    free = sorted(
        (s for s in every if s.alive and s.group in (None, ask.group) and s.shard_id not in ask.exclude
         and s.llama_cpp == ask.llama_cpp),
        key=lambda s: (-s.memory_bytes, s.shard_id),
    )  # fmt: skip
    chosen = _choose(free, ask)
    hold = _LeaseArgs(group=ask.group, lease_ms=int(LEASE_S * 1000))
    for shard in chosen:
        if not await _HOLD.run(redis, _lease(shard.shard_id), hold):  # another group took it just now: ask again
            return await assign(redis, ask.model_copy(update={"exclude": [*ask.exclude, shard.shard_id]}))
    chosen_ids = {s.shard_id for s in chosen}
    await release(
        redis, ask.group, [s.shard_id for s in every if s.group == ask.group and s.shard_id not in chosen_ids]
    )
    return [s.model_copy(update={"group": ask.group}) for s in chosen]


def _choose(free: list[Shard], ask: ShardAssign) -> list[Shard]:
    gib = 2**30
    lent = sum(s.memory_bytes for s in free)
    others = f"{len(free)} free shard hosts of llama.cpp {ask.llama_cpp} lend {lent / gib:.2f} GiB"
    if ask.count is not None:
        if len(free) < ask.count:
            raise NotEnoughShards(f"the group needs {ask.count} shard hosts; the pool's {others}")
        chosen = free[: ask.count]
        if sum(s.memory_bytes for s in chosen) < ask.memory_bytes:
            raise NotEnoughShards(
                f"the group needs {ask.memory_bytes / gib:.2f} GiB from {ask.count} shard hosts; the {ask.count} "
                f"that lend most lend {sum(s.memory_bytes for s in chosen) / gib:.2f} GiB (the pool's {others})"
            )
        return chosen
    chosen, total = [], 0
    for shard in free:
        if total >= ask.memory_bytes:
            break
        chosen.append(shard)
        total += shard.memory_bytes
    if total < ask.memory_bytes:
        raise NotEnoughShards(
            f"the group needs {ask.memory_bytes / gib:.2f} GiB from shard hosts; the pool's {others}: "
            f"{(ask.memory_bytes - lent) / gib:.2f} GiB are missing (start more with `gputorrent shard`)"
        )
    return chosen


async def renew(redis: RedisClient, group: str, shard_ids: list[str]) -> list[str]:
    """Extend the group's hold on these hosts while they live; the ids it still holds. A host whose
    heartbeat lapsed (dead, or its link cut) is let go: the group re-forms without it."""
    renewal = _LeaseArgs(group=group, lease_ms=int(LEASE_S * 1000))
    return [shard_id for shard_id in shard_ids if await _RENEW.run(redis, _lease(shard_id), renewal)]


async def release(redis: RedisClient, group: str, shard_ids: list[str] | None = None) -> None:
    """Let the group's hosts go (these only, with `shard_ids`)."""
    if shard_ids is None:
        shard_ids = [s.shard_id for s in await listing(redis) if s.group == group]
    for shard_id in shard_ids:
        await _RELEASE.run(redis, _lease(shard_id), _LeaseArgs(group=group, lease_ms=0))
