"""Nothing lost when a worker dies: leases in Redis, the reaper, attempts, stale results refused."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from gputorrent import auth, keys, pool_stats, queue, registry
from gputorrent.coordinator.reaper import FULL_LOOK_ROUNDS, Reaper
from gputorrent.protocol import Hardware, InferenceOptions, Job, JobResult, WorkerRecord


def _job(request_id: str, worker_id: str = "w1", attempt: int = 1) -> Job:
    return Job(
        request_id=request_id, worker_id=worker_id, model="m", prompt="p", options=InferenceOptions(),
        enqueued_at=time.time(), attempt=attempt,
    )  # fmt: skip


async def _register(redis: Redis, worker_id: str, alive: bool = True) -> None:
    record = WorkerRecord(
        worker_id=worker_id, models=["m"], backend="fake", slots=1, hardware=Hardware(), registered_at=time.time()
    )
    await registry.register(redis, record, heartbeat_ttl_s=30, secret_hash=auth.hash_secret("s"))
    if not alive:
        await registry.mark_gone(redis, worker_id)


def _result(request_id: str, worker_id: str = "w1") -> JobResult:
    return JobResult(request_id=request_id, status="completed", model="m", worker_id=worker_id, output="ok")


async def _jobs_in(redis: Redis, held_in: str) -> list[Job]:
    """The jobs whose request ids the list holds, read from their records."""
    return [Job.model_validate_json(body or "") for _, body in await queue.read_held(redis, held_in)]


def _reaper(redis: Redis, max_attempts: int = 3) -> Reaper:
    """A reaper that judges at once (no heartbeat timeout of sight to wait for)."""
    return Reaper(redis, interval_s=0.1, max_attempts=max_attempts, result_ttl_s=60, heartbeat_timeout_s=0)


async def test_a_taken_job_stays_in_redis_until_finished(redis: Redis) -> None:
    await queue.enqueue(redis, _job("r1"), ttl_s=60)
    lease = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert lease is not None and lease.job.request_id == "r1"
    assert await redis.lrange(keys.processing_key("w1"), 0, -1) == ["r1"]  # a queue holds request ids
    assert await queue.finish(redis, keys.processing_key("w1"), _result("r1"), ttl_s=60, streamed=False)
    assert await redis.llen(keys.processing_key("w1")) == 0
    assert await redis.exists(keys.result_key("r1"))


async def test_a_worker_that_lost_its_lease_cannot_write_a_result(redis: Redis) -> None:
    await queue.enqueue(redis, _job("r1"), ttl_s=60)
    lease = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert lease is not None
    await redis.delete(keys.processing_key("w1"))  # the reaper handed it on
    assert not await queue.finish(redis, keys.processing_key("w1"), _result("r1"), ttl_s=60, streamed=False)
    assert not await redis.exists(keys.result_key("r1"))


async def test_a_job_the_worker_cannot_read_fails_at_once_saying_why(redis: Redis) -> None:
    """A job a newer coordinator queued (a field this worker does not know) ends now, not at its deadline."""
    for request_id, stream in (("future-1", False), ("future-2", True)):
        job = _job(request_id).model_copy(update={"stream": stream})
        await queue.enqueue(redis, job, ttl_s=60)
        newer = job.model_dump_json().replace('"stream":', '"from_a_newer_version":1,"stream":')
        await redis.hset(keys.job_key(request_id), queue.JOB_FIELD, newer)
        assert await queue.pop(redis, "w1", timeout_s=0.1, result_ttl_s=60) is None
        found = await queue.lookup(redis, request_id)
        assert isinstance(found, JobResult) and found.status == "failed" and found.error is not None
        assert found.error.code == "unreadable_job" and found.model == "m"
        assert "from_a_newer_version: Extra inputs are not permitted" in found.error.message
        assert await redis.llen(keys.processing_key("w1")) == 0
    # The streamed one's stream ends with that result, so a follower stops too.
    entries = await redis.xrange(keys.stream_key("future-2"))
    assert [JobResult.model_validate_json(fields["result"]).error for _, fields in entries] == [found.error]

    # A job no result can be written from (not UTF-8 text) is dropped, and the worker carries on.
    job = _job("future-3")
    await queue.enqueue(redis, job, ttl_s=60)
    body = job.model_dump_json().replace('"model":"m"', '"model":"\\ud800"')
    await redis.hset(keys.job_key("future-3"), queue.JOB_FIELD, body)
    assert await queue.pop(redis, "w1", timeout_s=0.1, result_ttl_s=60) is None
    assert await redis.llen(keys.processing_key("w1")) == 0


async def test_a_job_whose_record_expired_is_dropped_and_the_next_one_taken(redis: Redis) -> None:
    """A queued request id whose status record (and so the job) is gone has nothing left to run."""
    for request_id in ("expired", "good"):
        await queue.enqueue(redis, _job(request_id), ttl_s=60)
    await redis.delete(keys.job_key("expired"))  # as its TTL would
    lease = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert lease is not None and lease.job.request_id == "good"
    assert await redis.lrange(keys.processing_key("w1"), 0, -1) == ["good"]


async def test_an_attempt_whose_job_moved_on_cannot_finish_it_even_on_the_same_worker(redis: Redis) -> None:
    """A shared job handed back to its model's queue while its worker stalled, and taken again by that
    same worker: the stalled attempt's finish and fail-over are refused, the new attempt's is stored."""
    shared = _job("shared", worker_id="").model_copy(update={"shared": True})
    await queue.enqueue(redis, shared, ttl_s=60)
    stalled = await queue.pop(redis, "w1", timeout_s=1, models=["m"], result_ttl_s=60)
    assert stalled is not None
    held_in = keys.processing_key("w1")
    # What the reaper does once w1 looks dead: the job goes back to its model's queue.
    assert await queue.retry_or_fail(redis, held_in, stalled.job, started=True, target=None, max_attempts=3, ttl_s=60)
    again = await queue.pop(redis, "w1", timeout_s=1, models=["m"], result_ttl_s=60)
    assert again is not None and again.job.attempt == stalled.job.attempt + 1 and again.fence != stalled.fence

    late = _result("shared")
    assert not await queue.finish(redis, held_in, late, ttl_s=60, streamed=False, fence=stalled.fence)
    assert not await queue.retry_or_fail(
        redis, held_in, stalled.job, started=True, target=None, max_attempts=3, ttl_s=60, fence=stalled.fence
    )
    assert await redis.lrange(held_in, 0, -1) == ["shared"]  # the new attempt's lease is untouched
    current = late.model_copy(update={"output": "the new attempt's"})
    assert await queue.finish(redis, held_in, current, ttl_s=60, streamed=False, fence=again.fence)
    assert await queue.lookup(redis, "shared") == current


async def test_a_job_whose_record_expired_is_not_moved(redis: Redis) -> None:
    await queue.enqueue(redis, _job("expired"), ttl_s=60)
    lease = await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60)
    assert lease is not None
    await redis.delete(keys.job_key("expired"))  # as its TTL would
    held_in = keys.processing_key("w1")
    assert not await queue.retry_or_fail(redis, held_in, lease.job, started=True, target="w2", max_attempts=3, ttl_s=60)
    assert await redis.llen(held_in) == await redis.llen(keys.queue_key("w2")) == 0


async def test_the_jobs_of_a_dead_worker_go_to_a_live_one(redis: Redis) -> None:
    await _register(redis, "w1")
    await _register(redis, "w2")
    for request_id in ("held", "waiting"):
        await queue.enqueue(redis, _job(request_id), ttl_s=60)
    # w1 holds "held", "waiting" is queued
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    await registry.mark_gone(redis, "w1")

    assert await _reaper(redis).reap_once() == 2
    moved = {job.request_id: job for job in await _jobs_in(redis, "queue:w2")}
    assert set(moved) == {"held", "waiting"}
    assert moved["held"].attempt == 2  # it had started
    assert moved["waiting"].attempt == 1  # it had not
    assert {j.worker_id for j in moved.values()} == {"w2"}
    assert await redis.hget(keys.job_key("held"), "worker_id") == "w2"
    assert await redis.llen(keys.processing_key("w1")) == await redis.llen(keys.queue_key("w1")) == 0


async def test_reapers_on_several_coordinators_move_each_job_once(redis: Redis) -> None:
    await _register(redis, "w1")
    await _register(redis, "w2")
    for i in range(50):
        await queue.enqueue(redis, _job(f"r{i}"), ttl_s=60)
    await registry.mark_gone(redis, "w1")
    handled = await asyncio.gather(*(_reaper(redis).reap_once() for _ in range(4)))
    assert sum(handled) == 50
    assert sorted(await redis.lrange("queue:w2", 0, -1)) == sorted(f"r{i}" for i in range(50))


async def test_a_job_that_outlives_its_attempts_fails_with_worker_lost(redis: Redis) -> None:
    await _register(redis, "w1")
    await _register(redis, "w2")
    await queue.enqueue(redis, _job("poison", attempt=3), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    await registry.mark_gone(redis, "w1")
    assert await _reaper(redis, max_attempts=3).reap_once() == 1
    found = await queue.lookup(redis, "poison")
    assert isinstance(found, JobResult)
    assert found.status == "failed" and found.error is not None and found.error.code == "worker_lost"
    assert await redis.llen(keys.queue_key("w2")) == 0
    [listed] = await pool_stats.recent_failures(redis)  # the dashboard's recent failures show it
    assert (listed.request_id, listed.code) == ("poison", "worker_lost")


async def test_jobs_wait_while_no_live_worker_serves_their_model(redis: Redis) -> None:
    await _register(redis, "w1")
    await queue.enqueue(redis, _job("r1"), ttl_s=60)
    await registry.mark_gone(redis, "w1")
    assert await _reaper(redis).reap_once() == 0
    assert await redis.llen(keys.queue_key("w1")) == 1


async def test_a_restarted_worker_takes_back_what_its_last_run_held(redis: Redis) -> None:
    for request_id in ("first", "second"):
        await queue.enqueue(redis, _job(request_id), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    assert await queue.recover(redis, "w1", max_attempts=3, ttl_s=60) == 2
    again = [await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) for _ in range(2)]
    assert [lease.job.request_id for lease in again if lease] == ["first", "second"]  # oldest first, as before
    assert [lease.job.attempt for lease in again if lease] == [2, 2]


async def test_a_job_that_crashes_its_worker_on_every_restart_ends_worker_lost(redis: Redis) -> None:
    await queue.enqueue(redis, _job("crasher", attempt=3), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None  # then the worker process dies
    assert await queue.recover(redis, "w1", max_attempts=3, ttl_s=60) == 1
    found = await queue.lookup(redis, "crasher")
    assert isinstance(found, JobResult) and found.error is not None and found.error.code == "worker_lost"


async def test_a_reaper_leaves_a_worker_that_came_back_alone(redis: Redis) -> None:
    await _register(redis, "w1")
    await _register(redis, "w2")
    await queue.enqueue(redis, _job("r1"), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    [job] = await _jobs_in(redis, keys.processing_key("w1"))
    # The reaper read w1 as dead, then w1's heartbeat came back before the move ran.
    handled = await queue.retry_or_fail(
        redis, keys.processing_key("w1"), job, started=True, target="w2", max_attempts=3, ttl_s=60, dead="w1"
    )
    assert not handled
    assert await redis.llen(keys.processing_key("w1")) == 1


# The liveness rule: no worker is judged dead on what could not be seen.
INTERVAL_S, TIMEOUT_S = 0.5, 3.0


class _Clock:
    """A reaper's clock, moved by the test: the rule is about time, and no test sleeps (monotonic for its
    sight; also its wall clock where a test passes it as one)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _judging_reaper(redis: Redis, clock: _Clock) -> Reaper:
    return Reaper(
        redis, interval_s=INTERVAL_S, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=TIMEOUT_S, clock=clock
    )


async def _rounds(reaper: Reaper, clock: _Clock, seconds: float) -> int:
    """The reaper's rounds, one an interval, for `seconds` of its clock; how many jobs they moved."""
    handled = 0
    for _ in range(round(seconds / INTERVAL_S)):
        clock.now += INTERVAL_S
        handled += await reaper.reap_once()
    return handled


async def _w1_holds_a_job(redis: Redis) -> None:
    await _register(redis, "w1")
    await _register(redis, "w2")
    await queue.enqueue(redis, _job("held"), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None


async def _queued_on_w2(redis: Redis) -> list[str]:
    return list(await redis.lrange(keys.queue_key("w2"), 0, -1))


async def test_a_new_reaper_judges_no_worker_dead_before_it_has_seen_redis_for_a_heartbeat_timeout(
    redis: Redis,
) -> None:
    await _w1_holds_a_job(redis)
    await registry.mark_gone(redis, "w1")  # its heartbeat key is absent
    clock = _Clock()
    reaper = _judging_reaper(redis, clock)
    assert await reaper.reap_once() == 0  # its first look: it cannot know how long the key has been gone
    assert await _rounds(reaper, clock, TIMEOUT_S - INTERVAL_S) == 0
    assert await redis.llen(keys.processing_key("w1")) == 1
    assert not await redis.exists(keys.liveness_grace(0))  # a first look is no break: nobody else holds off

    assert await _rounds(reaper, clock, INTERVAL_S) == 1  # a full timeout seen, w1 never beat: dead
    assert await _queued_on_w2(redis) == ["held"]


@pytest.mark.parametrize("broken_by", ["a failed call", "a gap between rounds"])
async def test_after_a_break_in_sight_no_reaper_moves_a_job_for_a_heartbeat_timeout(
    redis: Redis, broken_by: str
) -> None:
    await _w1_holds_a_job(redis)
    # Two coordinators' reapers, each with its own clock: a break in one's sight is not in the other's.
    seeing_clock, broken_clock = _Clock(), _Clock()
    seeing, broken = _judging_reaper(redis, seeing_clock), _judging_reaper(redis, broken_clock)
    for reaper, clock in ((seeing, seeing_clock), (broken, broken_clock)):
        assert await _rounds(reaper, clock, TIMEOUT_S + INTERVAL_S) == 0  # w1 alive: nothing to move
    if broken_by == "a failed call":
        broken.sight.lost()  # what its round does on a RedisError
    else:
        broken_clock.now += 1.5 * INTERVAL_S + 0.01  # Redis paused, or the coordinator's loop stalled
    await registry.mark_gone(redis, "w1")  # its key lapsed during the break: it could not beat either

    assert await broken.reap_once() == 0  # sees Redis again: holds off itself, and writes the grace
    assert 0 < await redis.pttl(keys.liveness_grace(0)) <= TIMEOUT_S * 1000
    assert await seeing.reap_once() == 0  # it saw no break, yet it holds off too
    assert seeing.sight.seen_for_s() >= TIMEOUT_S
    assert await _rounds(broken, broken_clock, TIMEOUT_S - INTERVAL_S) == 0
    assert await redis.llen(keys.processing_key("w1")) == 1

    await redis.delete(keys.liveness_grace(0))  # its TTL ran out: a full timeout, and w1 never beat
    assert await _rounds(broken, broken_clock, INTERVAL_S) == 1
    assert await _queued_on_w2(redis) == ["held"]


@pytest.mark.parametrize("attempt", [1, 3], ids=["moved", "failed worker_lost"])
async def test_a_reapers_move_is_refused_in_its_script_while_the_grace_holds(redis: Redis, attempt: int) -> None:
    await _register(redis, "w1")
    await _register(redis, "w2")
    await queue.enqueue(redis, _job("held", attempt=attempt), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    await registry.mark_gone(redis, "w1")
    [job] = await _jobs_in(redis, keys.processing_key("w1"))
    # A reaper that read w1 as dead and no grace, then another coordinator wrote the grace.
    await redis.set(keys.liveness_grace(0), "1", px=int(TIMEOUT_S * 1000))

    async def move() -> bool:
        return await queue.retry_or_fail(
            redis, keys.processing_key("w1"), job, started=True, target="w2", max_attempts=3, ttl_s=60, dead="w1"
        )

    assert not await move()
    assert await redis.lrange(keys.processing_key("w1"), 0, -1) == ["held"]
    assert not await redis.exists(keys.result_key("held"))

    await redis.delete(keys.liveness_grace(0))
    assert await move()


async def test_a_reaper_that_cannot_judge_liveness_still_ends_jobs_past_their_deadline(redis: Redis) -> None:
    await _register(redis, "w1")
    job = _job("late").model_copy(update={"deadline": time.time() - 1})
    await queue.enqueue(redis, job, ttl_s=60)
    reaper = _judging_reaper(redis, _Clock())
    assert await reaper.reap_once() == 0  # blind: it has just started
    assert await reaper.end_overdue() == 1  # deadlines are the client's, not a judgement of liveness
    found = await queue.lookup(redis, "late")
    assert isinstance(found, JobResult) and found.error is not None and found.error.code == "timeout"


def _retaining_reaper(redis: Redis, clock: _Clock, retention_s: float) -> Reaper:
    return Reaper(
        redis, interval_s=INTERVAL_S, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=0,
        dead_worker_retention_s=retention_s, clock=clock, wall_clock=clock,
    )  # fmt: skip


async def test_a_dead_worker_with_nothing_to_hand_on_leaves_the_registry_after_the_retention(redis: Redis) -> None:
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2")
    clock = _Clock()
    reaper = _retaining_reaper(redis, clock, retention_s=60)
    await reaper.reap_once()  # the first round that judges it dead
    clock.now += 59.9
    await reaper.reap_once()
    assert await redis.sismember(keys.workers(0), "w1")
    clock.now += 0.1
    await reaper.reap_once()
    assert not await redis.sismember(keys.workers(0), "w1")
    assert await redis.exists(keys.worker_key("w1"), keys.worker_secret_key("w1")) == 0  # its secret went too
    assert await redis.sismember(keys.workers(0), "w2") and await redis.exists(keys.worker_key("w2"))


async def test_a_dead_worker_that_still_holds_a_job_stays_past_the_retention(redis: Redis) -> None:
    await _register(redis, "w1")
    await queue.enqueue(redis, _job("held"), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    await registry.mark_gone(redis, "w1")  # it died holding the job, and no live worker serves its model
    clock = _Clock()
    reaper = _retaining_reaper(redis, clock, retention_s=0)
    await _rounds(reaper, clock, 2)
    assert await redis.sismember(keys.workers(0), "w1")
    assert [job.request_id for job in await _jobs_in(redis, keys.processing_key("w1"))] == ["held"]


async def test_a_worker_is_forgotten_only_while_dead_and_no_grace_holds(redis: Redis) -> None:
    await _register(redis, "w1")  # registered again since a reaper judged it dead: it beats
    assert not await registry.forget_dead(redis, "w1")
    await registry.mark_gone(redis, "w1")
    await redis.set(keys.liveness_grace(0), "1", px=60_000)  # a coordinator saw Redis again just now
    assert not await registry.forget_dead(redis, "w1")
    assert await redis.sismember(keys.workers(0), "w1")
    await redis.delete(keys.liveness_grace(0))
    assert await registry.forget_dead(redis, "w1")
    assert not await redis.sismember(keys.workers(0), "w1")


async def test_a_dead_worker_found_empty_is_read_again_when_the_lengths_index_shows_a_job(redis: Redis) -> None:
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2")
    reaper = _reaper(redis)
    assert await reaper.reap_once() == 0  # w1's lists are found empty
    await _register(redis, "w1")  # it came back, took a job and died again between two rounds
    await queue.enqueue(redis, _job("held"), ttl_s=60)
    assert await queue.pop(redis, "w1", timeout_s=1, result_ttl_s=60) is not None
    await registry.mark_gone(redis, "w1")
    assert await reaper.reap_once() == 1
    assert await _queued_on_w2(redis) == ["held"]


async def test_a_job_put_by_hand_on_a_dead_workers_list_is_found_at_the_next_full_look(redis: Redis) -> None:
    """The lengths index does not see a list changed by hand; the reaper reads every dead worker's
    lists again every `FULL_LOOK_ROUNDS` rounds."""
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2")
    reaper = _reaper(redis)
    assert await reaper.reap_once() == 0  # the first round: w1's lists are found empty
    await redis.lpush(keys.queue_key("w1"), "by-hand")  # the lengths index does not see it
    await redis.hset(keys.job_key("by-hand"), mapping={"status": "queued", "job": _job("by-hand").model_dump_json()})
    for _ in range(FULL_LOOK_ROUNDS - 2):
        await reaper.reap_once()
    assert await redis.llen(keys.queue_key("w1")) == 1  # not read again yet
    await reaper.reap_once()
    assert await redis.llen(keys.queue_key("w1")) == 0
    assert await _queued_on_w2(redis) == ["by-hand"]


async def test_the_retention_counts_from_the_first_coordinator_that_judged_the_worker_dead(redis: Redis) -> None:
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2")
    clock = _Clock()
    await _retaining_reaper(redis, clock, retention_s=60).reap_once()  # a coordinator judges w1 dead, then stops
    clock.now += 60
    await _retaining_reaper(redis, clock, retention_s=60).reap_once()  # a coordinator started since
    assert not await redis.sismember(keys.workers(0), "w1")
    assert not await redis.hexists(keys.dead_since(0), "w1")


async def test_a_worker_alive_again_starts_its_retention_afresh_when_it_dies_again(redis: Redis) -> None:
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2", alive=False)
    clock = _Clock()
    reaper = _retaining_reaper(redis, clock, retention_s=60)
    await reaper.reap_once()  # both judged dead at 1000
    await _register(redis, "w1")  # w1 is back
    clock.now += 30
    await reaper.reap_once()
    assert not await redis.hexists(keys.dead_since(0), "w1")
    await registry.mark_gone(redis, "w1")  # and dead again at 1030
    await reaper.reap_once()
    clock.now += 30
    await reaper.reap_once()  # 1060: w2's retention is over, not w1's
    assert await redis.sismember(keys.workers(0), "w1")
    assert not await redis.sismember(keys.workers(0), "w2")


async def test_a_death_recorded_before_a_registration_does_not_date_the_next_death(redis: Redis) -> None:
    """An entry left in `dead_since` (its reaper stopped before it saw the worker back) goes when the
    worker registers again, and when a round finds no worker dead."""
    clock = _Clock()
    await redis.hset(keys.dead_since(0), mapping={"w1": "0", "w2": "0"})  # long ago, by a coordinator gone since
    await _register(redis, "w1")
    assert not await redis.hexists(keys.dead_since(0), "w1")
    await _register(redis, "w2")
    await _retaining_reaper(redis, clock, retention_s=60).reap_once()  # nobody is dead
    assert not await redis.exists(keys.dead_since(0))
    await registry.mark_gone(redis, "w2")
    await _retaining_reaper(redis, clock, retention_s=60).reap_once()
    assert await redis.sismember(keys.workers(0), "w2")  # its retention starts now


class _CountingDeadSinceReads(Redis):
    """A client of the same Redis that counts its reads of the whole `dead_since` hash."""

    reads = 0

    async def hgetall(self, name: str) -> dict[str, str]:  # type: ignore[override]
        if name == keys.dead_since(0):
            self.reads += 1
        return await super().hgetall(name)  # type: ignore[no-any-return]


async def test_the_reaper_reads_dead_since_again_only_when_the_dead_workers_change(
    redis: Redis, redis_url: str
) -> None:
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2")
    counting = _CountingDeadSinceReads.from_url(redis_url, decode_responses=True)
    try:
        reaper = _retaining_reaper(counting, _Clock(), retention_s=60)
        for _ in range(5):
            await reaper.reap_once()
        assert counting.reads == 1
        await registry.mark_gone(redis, "w2")
        await reaper.reap_once()
        await reaper.reap_once()
        assert counting.reads == 2
        assert set(await redis.hkeys(keys.dead_since(0))) == {"w1", "w2"}
    finally:
        await counting.aclose()


async def test_a_worker_that_registered_and_died_again_between_two_rounds_gets_a_full_retention(redis: Redis) -> None:
    """The reaper keeps the `dead_since` it read while the dead workers stay the same; before it
    removes one it reads that entry again: a registration between its rounds deleted it."""
    await _register(redis, "w1", alive=False)
    await _register(redis, "w2")
    clock = _Clock()
    reaper = _retaining_reaper(redis, clock, retention_s=60)
    await reaper.reap_once()  # w1 dead since 1000
    clock.now += 59
    await _register(redis, "w1")  # back, and dead again before the next round saw it alive
    await registry.mark_gone(redis, "w1")
    clock.now += 1
    await reaper.reap_once()  # 1060: not 60 s since its second death
    assert await redis.sismember(keys.workers(0), "w1")
    clock.now += 60
    await reaper.reap_once()
    assert not await redis.sismember(keys.workers(0), "w1")
