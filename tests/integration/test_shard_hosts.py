"""Shard hosts and groups in process (gputorrent/shards.py, coordinator/routes/shards.py): registration,
liveness, which hosts a group gets (`--split N` and `auto`), leases between groups, and the 503 that
names what a pool is missing."""

from __future__ import annotations

from typing import Any

import httpx
from redis.asyncio import Redis

from gputorrent import keys

GIB = 2**30
VERSION = "0.3.36"


async def _shard(api: httpx.AsyncClient, shard_id: str, gib: float, version: str = VERSION) -> None:
    body = {"shard_id": shard_id, "address": "10.0.0.1", "port": 50052, "memory_bytes": int(gib * GIB),
            "devices": ["CPU"], "llama_cpp": version}  # fmt: skip
    reply = await api.post("/shards", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["shard_id"] == shard_id


async def _assign(api: httpx.AsyncClient, group: str, gib: float, **fields: Any) -> httpx.Response:
    return await api.post(
        "/shards/assign", json={"group": group, "memory_bytes": int(gib * GIB), "llama_cpp": VERSION, **fields}
    )


async def test_auto_takes_the_fewest_hosts_that_lend_enough_and_count_the_ones_that_lend_most(
    api: httpx.AsyncClient,
) -> None:
    for shard_id, gib in (("a", 8), ("b", 24), ("c", 16), ("old", 64)):
        await _shard(api, shard_id, gib, VERSION if shard_id != "old" else "0.2.0")  # another llama.cpp: never
    auto = await _assign(api, "leader1", 30)
    assert [s["shard_id"] for s in auto.json()["shards"]] == ["b", "c"]
    again = await _assign(api, "leader1", 10)  # the group asks again: it keeps what it needs, lets the rest go
    assert [s["shard_id"] for s in again.json()["shards"]] == ["b"]
    two = await _assign(api, "leader2", 1, count=2)  # b is leader1's: leader2 gets the next two
    assert [s["shard_id"] for s in two.json()["shards"]] == ["c", "a"]
    listed = {s["shard_id"]: s["group"] for s in (await api.get("/shards")).json()}
    assert listed == {"a": "leader2", "b": "leader1", "c": "leader2", "old": None}


async def test_a_pool_without_enough_shard_memory_answers_503_naming_what_is_missing(api: httpx.AsyncClient) -> None:
    await _shard(api, "a", 8)
    await _shard(api, "b", 4)
    short = await _assign(api, "leader", 40)
    assert short.status_code == 503
    error = short.json()["error"]
    assert error["code"] == "no_shards"
    assert "needs 40.00 GiB" in error["message"] and "2 free shard hosts" in error["message"]
    assert "28.00 GiB are missing" in error["message"]
    few = await _assign(api, "leader", 1, count=3)
    assert few.status_code == 503 and "needs 3 shard hosts" in few.json()["error"]["message"]


async def test_a_dead_host_is_no_longer_given_or_renewed_and_a_released_one_is_free(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    await _shard(api, "a", 8)
    await _shard(api, "b", 8)
    assert (await _assign(api, "leader", 1, count=2)).status_code == 200
    await redis.delete(keys.shard_beat_key("a"))  # its heartbeat lapsed
    renewed = await api.post("/shards/renew", json={"group": "leader", "shard_ids": ["a", "b"]})
    assert renewed.json() == {"shard_ids": ["b"]}
    assert (await _assign(api, "leader", 1, count=2)).status_code == 503
    await api.post("/shards/release", json={"group": "leader", "shard_ids": []})
    assert [s["group"] for s in (await api.get("/shards")).json()] == [None, None]
    assert (await api.post("/shards/b/beat", json={"memory_bytes": GIB})).status_code == 204
    unknown = await api.post("/shards/zzz/beat", json={"memory_bytes": GIB})
    assert (unknown.status_code, unknown.json()["error"]["field"]) == (404, "shard_id")


async def test_a_group_whose_lease_lapsed_neither_renews_nor_releases_the_next_groups_hold(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    await _shard(api, "a", 8)
    assert (await _assign(api, "leader1", 1, count=1)).status_code == 200
    await redis.delete(keys.shard_group_key("a"))  # leader1 stopped renewing: its lease lapsed
    assert [s["shard_id"] for s in (await _assign(api, "leader2", 1, count=1)).json()["shards"]] == ["a"]

    renewed = await api.post("/shards/renew", json={"group": "leader1", "shard_ids": ["a"]})
    assert renewed.json() == {"shard_ids": []}
    await api.post("/shards/release", json={"group": "leader1", "shard_ids": ["a"]})
    assert await redis.get(keys.shard_group_key("a")) == "leader2"
    ttl_ms = await redis.pttl(keys.shard_group_key("a"))
    renewed = await api.post("/shards/renew", json={"group": "leader2", "shard_ids": ["a"]})
    assert renewed.json() == {"shard_ids": ["a"]} and await redis.pttl(keys.shard_group_key("a")) >= ttl_ms


async def test_bad_shard_input_is_a_4xx_naming_the_field(api: httpx.AsyncClient) -> None:
    body = {"address": "shard.lan", "port": 50052, "memory_bytes": 1, "llama_cpp": VERSION}
    reply = await api.post("/shards", json=body)
    assert reply.status_code in (400, 422) and "address" in {f["field"] for f in reply.json()["error"]["fields"]}
    reply = await api.post("/shards/assign", json={"group": "g", "memory_bytes": -1, "llama_cpp": VERSION})
    assert reply.status_code in (400, 422) and "memory_bytes" in {f["field"] for f in reply.json()["error"]["fields"]}
