"""Registration in Redis: atomic, idempotent, and liveness by heartbeat."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gputorrent import auth, keys, leases, registry
from gputorrent.protocol import Group, Hardware, Heartbeat, WorkerRecord
from gputorrent.telemetry import MachineSample, ModelCounters, Telemetry


async def test_register_answers_with_id_and_heartbeat_interval(api: httpx.AsyncClient, redis: Redis) -> None:
    body = {
        "models": ["gemma3:270m"],
        "backend": "llamacpp",
        "slots": 2,
        "hardware": {"gpus": [{"name": "RTX 4090", "memory_total_bytes": 24 * 2**30}], "cpu_cores": 16},
    }
    response = await api.post("/register", json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["heartbeat_interval_s"] == 0.5
    worker_id = answer["worker_id"]
    record = WorkerRecord.model_validate_json(await redis.get(keys.worker_key(worker_id)))
    assert record.models == ["gemma3:270m"] and record.slots == 2
    assert record.hardware.gpus[0].name == "RTX 4090"
    assert await redis.sismember(keys.workers(0), worker_id)
    assert await redis.exists(keys.heartbeat_key(worker_id))


async def test_registering_the_same_id_twice_keeps_one_record(api: httpx.AsyncClient, redis: Redis) -> None:
    first = await api.post("/register", json={"worker_id": "w1", "models": ["a"], "backend": "fake"})
    second = await api.post("/register", json={"worker_id": "w1", "models": ["b"], "backend": "fake"})
    assert first.json()["worker_id"] == second.json()["worker_id"] == "w1"
    assert await redis.smembers(keys.workers(0)) == {"w1"}
    [worker] = (await api.get("/workers")).json()
    assert worker["models"] == ["b"]


async def test_concurrent_registrations_of_one_id_leave_one_whole_record(api: httpx.AsyncClient, redis: Redis) -> None:
    bodies = [{"worker_id": "w1", "models": [f"m{i}"], "backend": "fake", "slots": i + 1} for i in range(20)]
    responses = await asyncio.gather(*(api.post("/register", json=b) for b in bodies))
    assert {r.status_code for r in responses} == {200}
    assert await redis.smembers(keys.workers(0)) == {"w1"}
    record = WorkerRecord.model_validate_json(await redis.get(keys.worker_key("w1")))
    assert record.models == [f"m{record.slots - 1}"]  # models and slots come from the same registration


async def test_register_refuses_bad_bodies_naming_the_field(api: httpx.AsyncClient) -> None:
    response = await api.post("/register", json={"backend": "fake"})
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "models"
    bad_slots = await api.post("/register", json={"models": ["m"], "backend": "fake", "slots": 0})
    assert bad_slots.json()["error"]["fields"][0]["field"] == "slots"


async def test_a_worker_is_dead_once_its_heartbeat_expires(redis: Redis) -> None:
    record = WorkerRecord(
        worker_id="w1", models=["m"], backend="fake", slots=1, hardware=Hardware(), registered_at=time.time()
    )
    await registry.register(redis, record, heartbeat_ttl_s=0.2, secret_hash=auth.hash_secret("s"))
    assert [w.state for w in await registry.snapshot(redis)] == ["alive"]
    deadline = time.monotonic() + 5
    while await redis.exists(keys.heartbeat_key("w1")):  # Redis expires the key; wait for that event
        assert time.monotonic() < deadline, "heartbeat never expired"
        await asyncio.sleep(0.05)
    [state] = await registry.snapshot(redis)
    assert state.state == "dead" and state.last_heartbeat_at is None


async def test_heartbeats_report_jobs_in_flight_and_condition(redis: Redis, redis_url: str) -> None:
    record = WorkerRecord(
        worker_id="w1", models=["m"], backend="fake", slots=4, hardware=Hardware(), registered_at=time.time()
    )
    await registry.register(redis, record, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("s"))
    with SyncRedis.from_url(redis_url) as client:
        heartbeat = Heartbeat(at=time.time(), jobs_in_flight=3, condition="unhealthy", reason="backend down")
        registry.beat(client, "w1", heartbeat, ttl_s=5, swarm_epoch=False)
    [state] = await registry.snapshot(redis)
    assert state.jobs_in_flight == 3
    assert (state.state, state.state_reason) == ("unhealthy", "backend down")
    await registry.mark_gone(redis, "w1")
    assert [w.state for w in await registry.snapshot(redis)] == ["dead"]


async def test_the_snapshot_leaves_the_telemetry_in_redis_and_the_listings_read_it(
    redis: Redis, redis_url: str
) -> None:
    for worker_id in ("w1", "w2"):
        record = WorkerRecord(worker_id=worker_id, models=["m"], backend="fake", slots=1, hardware=Hardware(),
                              registered_at=time.time())  # fmt: skip
        await registry.register(redis, record, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("s"))
    telemetry = Telemetry(sampled_at=time.time(), machine=MachineSample(cpu_utilization_ratio=0.25),
                          jobs={"m": ModelCounters(completed=3)})  # fmt: skip
    with SyncRedis.from_url(redis_url) as client:
        registry.beat(client, "w1", Heartbeat(at=time.time(), jobs_in_flight=1, telemetry=telemetry), ttl_s=5,
                      swarm_epoch=False)  # fmt: skip
        # A heartbeat whose telemetry cannot be read: the worker is still alive, without telemetry.
        unreadable = json.dumps({"at": time.time(), "telemetry": {"sampled_at": -1}})
        client.set(keys.heartbeat_key("w2"), unreadable, px=5000)
    rows = await registry.snapshot(redis)
    assert [(w.worker_id, w.state, w.telemetry) for w in rows] == [("w1", "alive", None), ("w2", "alive", None)]
    assert rows[0].jobs_in_flight == 1
    shown = await registry.with_telemetry(redis, rows)
    assert [w.telemetry for w in shown] == [telemetry, None]
    assert [w.model_copy(update={"telemetry": None}) for w in shown] == rows

    # w1 restarts after the snapshot: its telemetry comes with the registration of the same run.
    again = WorkerRecord(worker_id="w1", models=["m"], backend="fake", slots=1, hardware=Hardware(),
                         registered_at=rows[0].registered_at + 10)  # fmt: skip
    await registry.register(redis, again, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("s"), force=True)
    with SyncRedis.from_url(redis_url) as client:
        registry.beat(client, "w1", Heartbeat(at=time.time(), telemetry=telemetry), ttl_s=5, swarm_epoch=False)
    [restarted, _] = await registry.with_telemetry(redis, rows)
    assert (restarted.registered_at, restarted.telemetry) == (again.registered_at, telemetry)


def test_only_a_worker_with_a_swarm_reads_the_swarms_epoch_when_it_beats(redis_url: str) -> None:
    def gets(client: SyncRedis) -> int:
        return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

    with SyncRedis.from_url(redis_url) as client:
        client.set(keys.swarm_epoch(), 7)
        client.config_resetstat()
        without = registry.beat(client, "w1", Heartbeat(at=time.time()), ttl_s=5, swarm_epoch=False)
        assert gets(client) == 0  # a SET and an EXISTS only
        with_swarm = registry.beat(client, "w1", Heartbeat(at=time.time()), ttl_s=5, swarm_epoch=True)
        assert gets(client) == 1
        assert (without.swarm_epoch, with_swarm.swarm_epoch) == (0, 7)
        assert client.exists(keys.heartbeat_key("w1"))


@pytest.mark.parametrize("coordinator_settings", [{"heartbeat_timeout_s": 600}], indirect=True)  # w3 stays alive
async def test_an_unreadable_heartbeat_or_record_is_a_dead_worker_not_a_broken_pool(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    for worker_id in ("w1", "w2", "w3"):
        body = {"worker_id": worker_id, "models": ["m"], "backend": "fake"}
        assert (await api.post("/register", json=body)).is_success
    # What a NaN used to leave behind (JSON has no NaN: it was stored as null), and a record no longer readable.
    await redis.set(keys.heartbeat_key("w1"), '{"at": null, "jobs_in_flight": 0}')
    await redis.set(keys.worker_key("w2"), '{"worker_id": "w2"}')
    states = {w.worker_id: w.state for w in await registry.snapshot(redis)}
    assert states == {"w1": "dead", "w2": "dead", "w3": "alive"}
    response = await api.get("/workers")
    assert response.status_code == 200
    assert [w["state"] for w in response.json()] == ["dead", "dead", "alive"]


def _record(worker_id: str, models: tuple[str, ...] = ("m",)) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id, models=list(models), backend="fake", slots=1, hardware=Hardware(),
        registered_at=time.time(),
    )  # fmt: skip


async def test_a_beat_that_looks_finds_a_removed_worker_and_tells_it_to_drain(redis: Redis, redis_url: str) -> None:
    await registry.register(redis, _record("w1"), heartbeat_ttl_s=5, secret_hash=auth.hash_secret("s"))
    with SyncRedis.from_url(redis_url) as client:
        beat = Heartbeat(at=time.time())
        assert not registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=False, registered=True).drain
        await registry.mark_gone(redis, "w1")
        assert await registry.forget_dead(redis, "w1")  # removed while it was away; now it beats again
        assert not registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=True).drain  # a beat that does not look
        assert registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=True, registered=True).drain


async def test_a_beat_that_looks_tells_a_worker_whose_id_was_registered_again_that_it_was_replaced(
    redis: Redis, redis_url: str
) -> None:
    first = _record("w1")
    await registry.register(redis, first, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("s"))
    with SyncRedis.from_url(redis_url) as client:
        beat = Heartbeat(at=time.time())
        answer = registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=False, registered=True,
                               registered_at=first.registered_at)  # fmt: skip
        assert not answer.drain and not answer.replaced
        second = _record("w1").model_copy(update={"registered_at": first.registered_at + 1})
        await registry.register(redis, second, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("t"), force=True)
        answer = registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=False, registered=True,
                               registered_at=first.registered_at)  # fmt: skip
        assert answer.drain and answer.replaced
        answer = registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=False, registered=True,
                               registered_at=second.registered_at)  # fmt: skip
        assert not answer.drain and not answer.replaced
        # A worker that does not know when it registered (a coordinator older than the field) only
        # tells a missing record.
        assert not registry.beat(client, "w1", beat, ttl_s=5, swarm_epoch=False, registered=True).drain


async def test_a_replaced_registration_is_not_changed_by_the_process_it_replaced(redis: Redis) -> None:
    """Record changes (a pulled model, a group) and the orphan check name the registration they act
    for: once another process registered the id, the first process's calls change nothing."""
    first = _record("w1")
    await registry.register(redis, first, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("s"))
    assert await registry.add_model(redis, "w1", "pulled", registered_at=first.registered_at)
    second = _record("w1").model_copy(update={"registered_at": first.registered_at + 1})
    await registry.register(redis, second, heartbeat_ttl_s=5, secret_hash=auth.hash_secret("t"), force=True)
    assert not await registry.add_model(redis, "w1", "stale", registered_at=first.registered_at)
    assert not await registry.set_group(redis, "w1", Group(hosts=[]), registered_at=first.registered_at)
    assert (await registry.snapshot(redis))[0].models == ["m"]
    await redis.rpush(keys.processing_key("w1"), "held-by-the-new-process")
    suspects: set[str] = set()
    for _ in range(2):  # an entry no consumer of the old process holds, on two looks
        requeued, suspects = await leases.reclaim_orphans(
            redis, "w1", set(), suspects, result_ttl_s=60, registered_at=first.registered_at
        )
        assert requeued == 0
    assert await redis.lrange(keys.processing_key("w1"), 0, -1) == ["held-by-the-new-process"]


async def test_a_snapshot_with_known_records_reads_them_again_only_when_the_registry_changed(redis: Redis) -> None:
    await registry.register(redis, _record("w1"), heartbeat_ttl_s=30, secret_hash=auth.hash_secret("s"))
    known = registry.KnownRecords()
    assert [w.models for w in await registry.snapshot(redis, known)] == [["m"]]
    await redis.set(keys.worker_key("w1"), _record("w1", ("by-hand",)).model_dump_json())  # the version stays
    assert [w.models for w in await registry.snapshot(redis, known)] == [["m"]]  # the known record
    assert await registry.add_model(redis, "w1", "pulled")  # a change through the registry moves the version
    assert [w.models for w in await registry.snapshot(redis, known)] == [["by-hand", "pulled"]]
    await registry.register(redis, _record("w2"), heartbeat_ttl_s=30, secret_hash=auth.hash_secret("s"))
    assert [w.worker_id for w in await registry.snapshot(redis, known)] == ["w1", "w2"]
    await registry.mark_gone(redis, "w2")
    assert await registry.deregister(redis, "w2")
    assert [w.worker_id for w in await registry.snapshot(redis, known)] == ["w1"]


async def test_a_record_changed_by_hand_shows_at_the_next_full_read(redis: Redis) -> None:
    await registry.register(redis, _record("w1"), heartbeat_ttl_s=30, secret_hash=auth.hash_secret("s"))
    known = registry.KnownRecords()
    await registry.snapshot(redis, known)
    await redis.set(keys.worker_key("w1"), _record("w1", ("by-hand",)).model_dump_json())
    for _ in range(registry.FULL_READ_EVERY - 1):
        assert [w.models for w in await registry.snapshot(redis, known)] == [["m"]]
    assert [w.models for w in await registry.snapshot(redis, known)] == [["by-hand"]]
