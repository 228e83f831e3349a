"""Shard hosts and the groups that hold them (gputorrent/shards.py): a model split over machines."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from gputorrent import shards
from gputorrent.coordinator.deps import RedisDep, SettingsDep
from gputorrent.coordinator.security import JoinDep, require_client
from gputorrent.errors import Conflict, NoShardsAvailable, NotFound
from gputorrent.protocol import MAX_BYTES, Shard, ShardAssign, ShardLease, ShardRegistration

log = logging.getLogger(__name__)
router = APIRouter(tags=["shards"])


class ShardRegistered(BaseModel):
    shard_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float


class ShardBeat(BaseModel):
    memory_bytes: int = Field(ge=0, le=MAX_BYTES)


class Assigned(BaseModel):
    group: str
    shards: list[Shard]


class Held(BaseModel):
    shard_ids: list[str]


@router.post("/shards", response_model=ShardRegistered)
async def register_shard(
    body: ShardRegistration, redis: RedisDep, settings: SettingsDep, caller: JoinDep
) -> ShardRegistered:
    """A shard host (`gputorrent shard`, with a join key) lends its `ggml-rpc-server` to the pool. A live
    host's id is its own: registering it again from another address is 409 (leaders would send it
    their weights)."""
    taken = await shards.live_address(redis, body.shard_id) if body.shard_id is not None else None
    if taken is not None and taken != (body.address, body.port):
        raise Conflict(f"a live shard host is registered as {body.shard_id!r} at {taken[0]}:{taken[1]}",
                       field="shard_id")  # fmt: skip
    shard_id = await shards.register(redis, body, settings.heartbeat_timeout_s)
    log.info("shard host %s registered at %s:%d lending %d MiB (%s)", shard_id, body.address, body.port,
             body.memory_bytes // 2**20, ", ".join(body.devices) or "no device listed")  # fmt: skip
    return ShardRegistered(
        shard_id=shard_id, heartbeat_interval_s=settings.heartbeat_interval_s,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
    )  # fmt: skip


@router.post("/shards/{shard_id}/beat", status_code=204, response_class=Response)
async def beat_shard(shard_id: str, body: ShardBeat, redis: RedisDep, settings: SettingsDep, caller: JoinDep) -> None:
    if not await shards.beat(redis, shard_id, body.memory_bytes, settings.heartbeat_timeout_s):
        raise NotFound(f"shard host {shard_id!r} is not registered: register it again", field="shard_id")


@router.delete("/shards/{shard_id}", status_code=204, response_class=Response)
async def remove_shard(shard_id: str, redis: RedisDep, caller: JoinDep) -> None:
    await shards.leave(redis, shard_id)


@router.get("/shards", response_model=list[Shard], dependencies=[Depends(require_client)])
async def list_shards(redis: RedisDep) -> list[Shard]:
    """Every shard host: where its `ggml-rpc-server` listens, what it lends, and the group holding it."""
    return await shards.listing(redis)


@router.post("/shards/assign", response_model=Assigned)
async def assign_shards(body: ShardAssign, redis: RedisDep, caller: JoinDep) -> Assigned:
    """A group's leader asks for shard hosts (see `shards.assign`); 503 `no_shards` says what is missing."""
    try:
        chosen = await shards.assign(redis, body)
    except shards.NotEnoughShards as e:
        raise NoShardsAvailable(str(e)) from None
    log.info("group %s holds shard hosts %s", body.group, ", ".join(s.shard_id for s in chosen) or "none")
    return Assigned(group=body.group, shards=chosen)


@router.post("/shards/renew", response_model=Held)
async def renew_shards(body: ShardLease, redis: RedisDep, caller: JoinDep) -> Held:
    return Held(shard_ids=await shards.renew(redis, body.group, body.shard_ids))


@router.post("/shards/release", status_code=204, response_class=Response)
async def release_shards(body: ShardLease, redis: RedisDep, caller: JoinDep) -> None:
    await shards.release(redis, body.group, body.shard_ids or None)
