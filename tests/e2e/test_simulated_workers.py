"""Simulated workers (`gputorrent.worker.simulated`, what bench/scale.py runs) against a real coordinator
process and Redis: they register, beat and serve jobs as real workers do, and leave when stopped."""

from __future__ import annotations

import asyncio

import httpx
from redis.asyncio import Redis

from gputorrent import keys
from gputorrent.worker.simulated import Simulation
from tests.conftest import eventually

WORKERS = 120  # more than the registrations sent at once, and than one snapshot chunk


async def test_simulated_workers_register_beat_serve_and_leave(
    coordinator_url: str, redis_url: str, redis: Redis
) -> None:
    simulation = Simulation(count=WORKERS, coordinator_url=coordinator_url, redis_url=redis_url, join_token=None,
                            model="fake", id_prefix="sim")  # fmt: skip
    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(simulation.run(stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        async with httpx.AsyncClient(base_url=coordinator_url, timeout=30) as api:

            async def all_alive() -> bool:
                listed = (await api.get("/workers")).json()
                return sum(w["state"] == "alive" for w in listed) == WORKERS

            await eventually(all_alive, f"{WORKERS} simulated workers listed alive", timeout_s=30)

            async def ask(i: int) -> tuple[str | None, str]:
                """(the worker it was routed to, its text)"""
                body = {"model": "fake", "prompt": f"hello {i}", "options": {"max_tokens": 8}}
                accepted = await api.post("/inference", json=body)
                assert accepted.status_code == 202, accepted.text
                request_id = accepted.json()["request_id"]
                result = await api.get(f"/result/{request_id}", params={"wait": 20})
                assert result.json()["status"] == "completed", result.text
                return accepted.json()["worker_id"], result.json()["output"]

            answers = await asyncio.gather(*(ask(i) for i in range(60)))
        assert [text for _, text in answers] == [f"echo: hello {i}" for i in range(60)]
        assert len({worker for worker, _ in answers}) >= 30  # a burst spreads over the idle workers
        assert await redis.scard(keys.workers(0)) == WORKERS
        assert all([await redis.exists(keys.heartbeat_key(f"sim-{i:05d}")) for i in range(WORKERS)])
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
    assert await redis.scard(keys.workers(0)) == 0  # each one left the pool as it stopped
