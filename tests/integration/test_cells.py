"""The pool in cells (docs/architecture.md, "Redis Cluster"), laid out on the one test Redis: a Redis
Cluster refuses a script whose keys lie in two cells, and `keys.check_one_cell` refuses it here, so
every transition below ran in one cell."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import auth, keys, leases, queue, registry
from gputorrent.coordinator.dispatch import new_request_id
from gputorrent.coordinator.reaper import Reaper
from gputorrent.protocol import Hardware, Heartbeat, Job, JobResult, WorkerRecord
from gputorrent.worker.link import RedisLink
from gputorrent.worker.main import Worker

MakeWorker = Callable[..., Awaitable[Worker]]
CELLS = ("{t0}", "{t1}", "{t2}")


@pytest.fixture(autouse=True)
def _three_cells() -> Iterator[None]:
    keys.use_cells(CELLS)
    yield
    keys.use_cells()


def _id_in(cell: int, prefix: str) -> str:
    """The first of `prefix0`, `prefix1`, ... that lies in `cell`."""
    return next(f"{prefix}{i}" for i in range(1000) if keys.cell_of(f"{prefix}{i}") == cell)


async def _result(api: httpx.AsyncClient, request_id: str) -> JobResult:
    response = await api.get(f"/result/{request_id}")
    assert response.status_code == 200, response.text
    return JobResult.model_validate(response.json())


async def test_requests_through_the_api_lie_in_their_workers_cells_and_are_answered(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    workers = [await fake_worker(_id_in(cell, "w")) for cell in keys.cells()]
    accepted = []
    for _ in range(9):
        response = await api.post("/inference", json={"model": "fake", "prompt": "hello cells"})
        assert response.status_code == 202, response.text
        accepted.append(response.json())
    assert {keys.cell_of(a["worker_id"]) for a in accepted} == set(keys.cells())  # least loaded spreads them
    for a in accepted:
        assert keys.cell_of(a["request_id"]) == keys.cell_of(a["worker_id"])
    await asyncio.gather(*(worker.run(asyncio.Event(), burst=True) for worker in workers))
    for a in accepted:
        result = await _result(api, a["request_id"])
        assert result.status == "completed" and result.worker_id == a["worker_id"]


async def test_a_request_that_names_itself_is_admitted_in_its_names_cell(
    api: httpx.AsyncClient, fake_worker: MakeWorker
) -> None:
    workers = [await fake_worker(_id_in(cell, "w")) for cell in keys.cells()]
    for cell in keys.cells():
        request_id = _id_in(cell, "my-request-")
        body = {"model": "fake", "prompt": "named", "request_id": request_id}
        response = await api.post("/inference", json=body)
        assert response.status_code == 202, response.text
        assert keys.cell_of(response.json()["worker_id"]) == cell
        again = await api.post("/inference", json=body)  # its idempotency record is in the same cell
        assert again.json() == {**response.json(), "replayed": True}
    await asyncio.gather(*(worker.run(asyncio.Event(), burst=True) for worker in workers))
    assert (await _result(api, _id_in(2, "my-request-"))).status == "completed"


def _job(request_id: str, worker_id: str, **fields: object) -> Job:
    return Job(request_id=request_id, worker_id=worker_id, model="m", prompt="p", enqueued_at=time.time(), **fields)


def _not_the_keys_cell(key_id: str, step: int = 1) -> int:
    """A cell other than the one `key_id`'s counters lie in."""
    return (keys.cell_of(key_id) + step) % len(keys.cells())


def test_each_api_keys_counters_lie_in_its_ids_cell() -> None:
    for key_id in ("k1", "k2", "k3", "k4"):
        cell = keys.cell_of(key_id)
        assert keys.cell_named(keys.rate_key(key_id, 1)) == keys.cell_named(keys.open_streams_key(key_id)) == cell
        assert queue.Limits(rate_key=keys.rate_key(key_id, 1)).cell == cell
    assert {keys.cell_of(key_id) for key_id in ("k1", "k2", "k3", "k4")} != {keys.HOME_CELL}  # spread, not all in 0


async def test_a_keys_limits_are_counted_in_the_jobs_script_when_the_job_is_in_the_keys_cell(redis: Redis) -> None:
    cell = keys.cell_of("k1")
    worker_id = _id_in(cell, "w")
    rate_key = keys.rate_key("k1", int(time.time() // 60))
    limits = queue.Limits(rate_key=rate_key, tokens=5, rpm=1, rate_ttl_s=120)
    await queue.enqueue(redis, _job(new_request_id(cell), worker_id), ttl_s=60, owner="k1", limits=limits)
    assert await redis.hgetall(rate_key) == {"requests": "1", "tokens": "5"}
    with pytest.raises(queue.Refused) as refused:
        await queue.enqueue(redis, _job(new_request_id(cell), worker_id), ttl_s=60, owner="k1", limits=limits)
    assert refused.value.limit == "rate"
    assert await redis.llen(keys.queue_key(worker_id)) == 1


async def test_a_keys_limits_in_another_cell_are_counted_apart_and_given_back_when_refused(redis: Redis) -> None:
    cell = _not_the_keys_cell("k1")  # the key's counters are in its own id's cell
    worker_id = _id_in(cell, "w")
    rate_key = keys.rate_key("k1", int(time.time() // 60))
    limits = queue.Limits(rate_key=rate_key, tokens=5, rpm=2, rate_ttl_s=120, max_queued=1)
    await queue.enqueue(redis, _job(new_request_id(cell), worker_id), ttl_s=60, owner="k1", limits=limits)
    assert await redis.hgetall(rate_key) == {"requests": "1", "tokens": "5"}
    with pytest.raises(queue.Refused) as refused:  # the worker's queue holds its one job: refused in the cell
        await queue.enqueue(redis, _job(new_request_id(cell), worker_id), ttl_s=60, owner="k1", limits=limits)
    assert refused.value.limit == "queue"
    assert await redis.hgetall(rate_key) == {"requests": "1", "tokens": "5"}  # given back
    other = _id_in(cell, "x")
    await queue.enqueue(redis, _job(new_request_id(cell), other), ttl_s=60, owner="k1", limits=limits)
    with pytest.raises(queue.Refused) as refused:  # the key's minute is used up: refused before the cell
        await queue.enqueue(redis, _job(new_request_id(cell), other), ttl_s=60, owner="k1", limits=limits)
    assert refused.value.limit == "rate"
    assert await redis.llen(keys.queue_key(other)) == 1


async def test_a_stream_slot_taken_apart_is_given_back_when_the_job_is_refused(redis: Redis) -> None:
    cell = _not_the_keys_cell("k1", step=2)
    worker_id = _id_in(cell, "w")
    streams_key = keys.open_streams_key("k1")
    limits = queue.Limits(streams_key=streams_key, max_streams=5, max_queued=1)
    first = new_request_id(cell)
    await queue.enqueue(redis, _job(first, worker_id, stream=True), ttl_s=60, owner="k1", limits=limits)
    with pytest.raises(queue.Refused):
        await queue.enqueue(
            redis, _job(new_request_id(cell), worker_id, stream=True), ttl_s=60, owner="k1", limits=limits
        )
    assert await redis.zrange(streams_key, 0, -1) == [first]
    with pytest.raises(queue.AdmittedBefore):  # a repeat of the first: its slot is the first's, and stays
        await queue.enqueue(redis, _job(first, worker_id, stream=True), ttl_s=60, owner="k1", limits=limits)
    assert await redis.zrange(streams_key, 0, -1) == [first]


async def _register(redis: Redis, worker_id: str, *, alive: bool = True) -> None:
    record = WorkerRecord(worker_id=worker_id, models=["m"], backend="fake", slots=1, hardware=Hardware(),
                          registered_at=time.time())  # fmt: skip
    await registry.register(redis, record, heartbeat_ttl_s=30, secret_hash=auth.hash_secret("s"))
    if not alive:
        await registry.mark_gone(redis, worker_id)


def _reaper(redis: Redis) -> Reaper:
    return Reaper(redis, interval_s=0.1, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=0)


async def test_a_dead_workers_job_moves_to_a_worker_of_its_cell_or_to_its_cells_shared_queue(redis: Redis) -> None:
    dead, beside, elsewhere = _id_in(1, "a"), _id_in(1, "b"), _id_in(2, "c")
    for worker_id in (dead, beside, elsewhere):
        await _register(redis, worker_id)
    first = new_request_id(1)
    await queue.enqueue(redis, _job(first, dead), ttl_s=60)
    await registry.mark_gone(redis, dead)
    assert await _reaper(redis).reap_once() == 1
    assert await redis.lrange(keys.queue_key(beside), 0, -1) == [first]  # never to the worker of another cell
    await registry.mark_gone(redis, beside)
    assert await _reaper(redis).reap_once() == 1  # no worker of its cell is left: its cell's shared queue
    assert await redis.lrange(keys.model_queue_key("m", cell=1), 0, -1) == [first]
    assert await redis.llen(keys.queue_key(elsewhere)) == 0


async def test_deadlines_are_kept_and_ended_cell_by_cell(redis: Redis) -> None:
    late = [new_request_id(cell) for cell in keys.cells()]
    for cell, request_id in zip(keys.cells(), late, strict=True):
        worker_id = _id_in(cell, "w")
        await _register(redis, worker_id)
        await queue.enqueue(redis, _job(request_id, worker_id, deadline=time.time() - 1), ttl_s=60)
        assert await redis.zscore(keys.deadlines(cell), request_id) is not None
    assert await _reaper(redis).end_overdue() == 3
    for request_id in late:
        found = await queue.lookup(redis, request_id)
        assert isinstance(found, JobResult) and found.error is not None and found.error.code == "timeout"


async def test_the_snapshot_reads_every_cell_and_counts_each_workers_lists(redis: Redis) -> None:
    ids = sorted(_id_in(cell, "w") for cell in keys.cells())
    for worker_id in ids:
        await _register(redis, worker_id)
    queued_for = ids[1]
    await queue.enqueue(redis, _job(new_request_id(keys.cell_of(queued_for)), queued_for), ttl_s=60)
    known = registry.KnownRecords()
    for _ in range(2):  # a full read, then one on the records it kept
        states = await registry.snapshot(redis, known)
        assert [w.worker_id for w in states] == ids
        assert [w.queue_length for w in states] == [int(w == queued_for) for w in ids]
        assert set(known.cells) == set(keys.cells())


async def test_a_workers_id_left_in_cell_0s_workers_is_read_in_its_own_cell_only(redis: Redis) -> None:
    """A pool on a cluster from before its twelve cells left every worker's id in cell 0's `workers`:
    read there, its keys would be another cell's (a cluster refuses such an MGET)."""
    elsewhere = _id_in(1, "w")
    await _register(redis, elsewhere)
    await redis.sadd(keys.workers(0), elsewhere)
    states = await registry.snapshot(redis, registry.KnownRecords())
    assert [w.worker_id for w in states] == [elsewhere]


async def _enqueue_shared(redis: Redis, cell: int) -> str:
    """A job on model m's shared queue of `cell`, as admission puts one there."""
    request_id = new_request_id(cell)
    await queue.enqueue(redis, _job(request_id, "", shared=True), ttl_s=60)
    return request_id


async def test_a_worker_takes_from_a_cell_whose_shared_queue_none_of_its_own_serves_and_finishes_there(
    redis: Redis,
) -> None:
    taker = _id_in(0, "w")
    await _register(redis, taker)
    request_id = await _enqueue_shared(redis, 1)
    assert await queue.pop(redis, taker, 0.05, ["m"], result_ttl_s=60) is None  # not asked yet: only its own cell
    await _reaper(redis).reap_once()  # sees cell 1's queue with no worker of m, and asks the taker
    assert await redis.smembers(keys.abroad_key(taker)) == {"1"}
    lease = await queue.pop(redis, taker, 0.05, ["m"], result_ttl_s=60, presence_ttl_s=30)
    assert lease is not None and lease.job.request_id == request_id and lease.job.worker_id == taker
    assert await redis.lrange(keys.processing_key(taker, 1), 0, -1) == [request_id]
    assert await redis.exists(keys.heartbeat_key(taker, 1))  # its presence in cell 1, with the job
    assert not await redis.exists(keys.abroad_key(taker))
    done = JobResult(request_id=request_id, status="completed", model="m", worker_id=taker, output="ok")
    assert await queue.finish(redis, keys.held_in(taker, request_id), done, 60, streamed=False, fence=lease.fence)
    assert await queue.lookup(redis, request_id) == done


async def test_a_job_held_abroad_by_a_worker_whose_presence_there_lapsed_goes_back_to_its_cells_queue(
    redis: Redis,
) -> None:
    taker = _id_in(0, "w")
    await _register(redis, taker)
    request_id = await _enqueue_shared(redis, 1)
    reaper = _reaper(redis)
    await reaper.reap_once()
    assert await queue.pop(redis, taker, 0.05, ["m"], result_ttl_s=60, presence_ttl_s=30) is not None
    assert await reaper.reap_once() == 0  # present there: it keeps the job
    await redis.delete(keys.heartbeat_key(taker, 1))  # it stopped beating there (its home beat may go on)
    assert await reaper.reap_once() == 1
    assert await redis.lrange(keys.model_queue_key("m", cell=1), 0, -1) == [request_id]
    assert await redis.llen(keys.processing_key(taker, 1)) == 0
    job = Job.model_validate_json(await redis.hget(keys.job_key(request_id), queue.JOB_FIELD) or "")
    assert job.attempt == 2  # its first attempt, abroad, counted


async def test_a_named_request_whose_cell_has_no_worker_of_its_model_is_answered_from_abroad(
    api: httpx.AsyncClient, redis: Redis, fake_worker: MakeWorker
) -> None:
    worker = await fake_worker(_id_in(0, "w"))
    request_id = _id_in(2, "my-request-")
    response = await api.post("/inference", json={"model": "fake", "prompt": "far", "request_id": request_id})
    assert response.status_code == 202, response.text
    assert response.json()["worker_id"] is None  # its cell's shared queue
    await _reaper(redis).reap_once()
    await worker.run(asyncio.Event(), burst=True)
    result = await _result(api, request_id)
    assert result.status == "completed" and result.worker_id == worker.worker_id


async def test_a_keys_limits_that_count_nothing_name_no_key_of_another_cell(redis: Redis) -> None:
    cell = _not_the_keys_cell("k1")
    worker_id = _id_in(cell, "w")
    off = queue.Limits(rate_key=keys.rate_key("k1", 1), streams_key=keys.open_streams_key("k1"), max_streams=4)
    request_id = new_request_id(cell)
    assert await queue.enqueue(redis, _job(request_id, worker_id), ttl_s=60, owner="k1", limits=off) == request_id
    assert not await redis.exists(keys.rate_key("k1", 1), keys.open_streams_key("k1"))


async def test_a_worker_keeps_its_presence_where_it_runs_a_job_taken_from_abroad(redis: Redis, redis_url: str) -> None:
    taker = _id_in(0, "w")
    await _register(redis, taker)
    request_id = await _enqueue_shared(redis, 1)
    await _enqueue_shared(redis, 1)  # a second: the take answers that more wait there
    await _reaper(redis).reap_once()
    assert await queue.pop(redis, taker, 0.05, ["m"], result_ttl_s=60, presence_ttl_s=30) is not None
    assert await redis.smembers(keys.abroad_key(taker)) == {"1"}  # it comes back for the second
    await redis.delete(keys.heartbeat_key(taker, 1))
    # A worker linked to Redis: its beat, naming the job it runs, writes its presence there again.
    link = RedisLink(redis, redis_url, taker, heartbeat_ttl_s=30, max_attempts=3, result_ttl_s=60)
    sender = link.heartbeat_sender(swarm_epoch=False)
    try:
        sender.send(Heartbeat(at=time.time(), jobs_in_flight=1), [request_id])
    finally:
        sender.close()
    assert await redis.pttl(keys.heartbeat_key(taker, 1)) > 25_000
    await redis.delete(keys.heartbeat_key(taker, 1))
    # One linked through the coordinator: its beat's answer keeps the job, and its presence.
    answer = await leases.beat(redis, taker, Heartbeat(at=time.time(), jobs_in_flight=1), 30, [request_id])
    assert answer is not None and answer.ended == []
    assert await redis.exists(keys.heartbeat_key(taker, 1))
