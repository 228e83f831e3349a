"""The `/worker` routes: a worker proves its id with its secret, and can write only to the jobs
leased to it, whatever it sends (checked in Redis by the same scripts a Redis-linked worker runs)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis

from gputorrent import keys, leases
from gputorrent.coordinator.reaper import Reaper
from gputorrent.coordinator.routes.worker import TakesInFlight
from gputorrent.protocol import Heartbeat, Job, JobResult, Taken, WorkerBeat
from tests.conftest import eventually

# Workers registered here never beat: they stay alive for the test, not the reaper's to hand on.
pytestmark = pytest.mark.parametrize("coordinator_settings", [{"heartbeat_timeout_s": 600}], indirect=True)


async def _register(api: httpx.AsyncClient, worker_id: str) -> dict[str, str]:
    """Register a worker through the coordinator; its credential as request headers."""
    response = await api.post("/register", json={"worker_id": worker_id, "models": ["fake"], "backend": "fake"})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {worker_id}:{response.json()['worker_secret']}"}


async def _submit(api: httpx.AsyncClient, prompt: str) -> str:
    response = await api.post("/inference", json={"model": "fake", "prompt": prompt})
    assert response.status_code == 202, response.text
    return str(response.json()["request_id"])


async def _take(api: httpx.AsyncClient, worker: dict[str, str]) -> Job | None:
    response = await api.post("/worker/take", params={"wait_s": 0}, headers=worker)
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    return Taken.model_validate_json(response.content).job


def _result(job: Job, output: str, worker_id: str) -> dict[str, object]:
    result = JobResult(
        request_id=job.request_id, status="completed", model=job.model, worker_id=worker_id, output=output
    )
    return result.model_dump(mode="json")


@pytest.fixture
async def two_workers(api: httpx.AsyncClient) -> tuple[dict[str, str], dict[str, str], Job]:
    """Worker B holding a job it took; worker A, registered after, holding nothing."""
    b = await _register(api, "b")
    await _submit(api, "the job of b")
    job = await _take(api, b)
    assert job is not None and job.worker_id == "b"
    a = await _register(api, "a")
    return a, b, job


async def test_a_worker_cannot_write_the_result_or_stream_of_another_workers_job(
    api: httpx.AsyncClient, redis: Redis, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    a, b, job = two_workers
    rid = job.request_id
    forged = _result(job, "forged by a", worker_id="b")  # even naming b as the author
    assert (await api.post(f"/worker/jobs/{rid}/result", json=forged, headers=a)).status_code == 409
    stream_text = {"text": "forged", "tokens": 1}
    assert (await api.post(f"/worker/jobs/{rid}/stream", json=stream_text, headers=a)).status_code == 409
    assert (await api.get(f"/worker/jobs/{rid}/stream", headers=a)).status_code == 409  # nor read it
    assert (await api.post(f"/worker/jobs/{rid}/fail-over", headers=a)).status_code == 409
    assert await _take(api, a) is None  # and b's job is not a's to take
    assert await redis.exists(keys.stream_key(rid), keys.result_key(rid)) == 0

    assert (
        await api.post(f"/worker/jobs/{rid}/stream", json={"text": "real", "tokens": 1}, headers=b)
    ).status_code == 204
    assert (await api.post(f"/worker/jobs/{rid}/result", json=_result(job, "real", "b"), headers=b)).status_code == 204
    # Once finished, nobody overwrites it: not a, and not b either.
    assert (await api.post(f"/worker/jobs/{rid}/result", json=forged, headers=a)).status_code == 409
    assert (await api.post(f"/worker/jobs/{rid}/result", json=_result(job, "again", "b"), headers=b)).status_code == 409
    assert (await api.post(f"/worker/jobs/{rid}/stream", json=stream_text, headers=a)).status_code == 409
    stored = (await api.get(f"/result/{rid}")).json()
    assert (stored["output"], stored["worker_id"]) == ("real", "b")
    assert [fields["text"] for _, fields in await redis.xrange(keys.stream_key(rid)) if "text" in fields] == ["real"]


async def test_a_result_is_stored_as_the_credentials_worker_and_a_repeated_finish_is_answered_again(
    api: httpx.AsyncClient, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    _, b, job = two_workers
    rid = job.request_id
    lying = _result(job, "done", worker_id="someone-else")
    assert (await api.post(f"/worker/jobs/{rid}/result", json=lying, headers=b)).status_code == 204
    # The answer to the first call was lost, say: the same result again is answered as stored.
    assert (await api.post(f"/worker/jobs/{rid}/result", json=lying, headers=b)).status_code == 204
    assert (await api.get(f"/result/{rid}")).json()["worker_id"] == "b"
    other = _result(job, "done", "b") | {"request_id": "another-request-id"}
    assert (await api.post(f"/worker/jobs/{rid}/result", json=other, headers=b)).status_code == 422


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer b",
        "Bearer b:not-its-secret",
        "Bearer nobody:whatever",
        "Basic Yjpz",
    ],
)
async def test_a_missing_or_wrong_worker_credential_is_401(
    api: httpx.AsyncClient, two_workers: tuple[dict[str, str], dict[str, str], Job], authorization: str | None
) -> None:
    _, _, job = two_workers
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in [
        ("POST", "/worker/take"),
        ("POST", f"/worker/jobs/{job.request_id}/result"),
        ("POST", "/worker/leave"),
    ]:
        # A bare client without the fixture's admin key: an API key is no worker credential either.
        async with httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url)) as bare:
            response = await bare.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert "secret" not in response.text.partition("not its secret")[2]


async def test_an_api_key_is_not_a_worker_credential(api: httpx.AsyncClient) -> None:
    assert (await api.post("/worker/take", params={"wait_s": 0})).status_code == 401  # the admin key


async def test_another_workers_secret_does_not_open_its_id(
    api: httpx.AsyncClient, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    a, _, job = two_workers
    a_secret = a["Authorization"].rpartition(":")[2]
    as_b = {"Authorization": f"Bearer b:{a_secret}"}
    response = await api.post(f"/worker/jobs/{job.request_id}/result", json=_result(job, "x", "b"), headers=as_b)
    assert response.status_code == 401


async def test_the_heartbeat_answer_names_running_jobs_ended_elsewhere(
    api: httpx.AsyncClient, redis: Redis, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    _, b, job = two_workers
    beat = WorkerBeat(heartbeat=Heartbeat(at=0.0, jobs_in_flight=1), running=[job.request_id]).model_dump(mode="json")
    answer = (await api.post("/worker/heartbeat", json=beat, headers=b)).json()
    assert answer == {"drain": False, "replaced": False, "ended": [], "swarm_epoch": 0}
    assert await redis.exists(keys.heartbeat_key("b"))
    assert (await api.delete(f"/inference/{job.request_id}")).status_code == 200  # the client cancels it
    answer = (await api.post("/worker/heartbeat", json=beat, headers=b)).json()
    assert answer["ended"] == [job.request_id]
    assert (await api.post("/admin/workers/b/drain")).status_code == 202
    assert (await api.post("/worker/heartbeat", json=beat, headers=b)).json()["drain"] is True


async def test_a_worker_hands_on_fails_over_and_reclaims_only_its_own_jobs(
    api: httpx.AsyncClient, redis: Redis, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    a, b, job = two_workers
    rid = job.request_id
    # a has nothing to hand on, and b's held job is not among a's orphans.
    assert (await api.post("/worker/hand-on", json={"held": True}, headers=a)).json() == {"jobs": 0}
    checked = (await api.post("/worker/orphans", json={"held": [], "suspects": [rid]}, headers=a)).json()
    assert checked == {"jobs": 0, "suspects": []}
    assert await redis.llen(keys.processing_key("b")) == 1
    # b's backend is down: its job goes to the other live worker, with an attempt counted.
    assert (await api.post(f"/worker/jobs/{rid}/fail-over", headers=b)).json() == {"jobs": 1}
    handed = await _take(api, a)
    assert handed is not None and (handed.request_id, handed.attempt) == (rid, 2)
    assert (await api.post(f"/worker/jobs/{rid}/result", json=_result(job, "x", "b"), headers=b)).status_code == 409
    # a's take never got its answer, say: unheld on two looks in a row, the job goes back to a's queue.
    first = (await api.post("/worker/orphans", json={"held": [], "suspects": []}, headers=a)).json()
    assert first == {"jobs": 0, "suspects": [rid]}
    second = (await api.post("/worker/orphans", json={"held": [], "suspects": [rid]}, headers=a)).json()
    assert second == {"jobs": 1, "suspects": []}
    assert await redis.llen(keys.queue_key("a")) == 1
    assert (await api.post("/worker/leave", headers=a)).json() == {"left": False}  # it still has a queued job
    assert (await api.post("/worker/leave", headers=b)).json() == {"left": True}


@pytest.mark.parametrize(
    "beat",
    [
        '{"heartbeat": {"at": NaN}}',
        '{"heartbeat": {"at": 1.0, "tokens_per_s": Infinity}}',
        '{"heartbeat": {"at": 1.0, "tokens_per_s": 1e300}}',
        '{"heartbeat": {"at": 1.0, "jobs_in_flight": -5}}',
        '{"heartbeat": {"at": -1.0}}',
        '{"heartbeat": {"at": 1.0, "telemetry": {"sampled_at": NaN}}}',
    ],
)
async def test_a_heartbeat_with_a_figure_json_cannot_hold_or_out_of_range_is_422_and_the_pool_still_reads(
    api: httpx.AsyncClient, redis: Redis, two_workers: tuple[dict[str, str], dict[str, str], Job], beat: str
) -> None:
    _, b, _ = two_workers
    headers = b | {"content-type": "application/json"}
    before = await redis.get(keys.heartbeat_key("b"))
    assert (await api.post("/worker/heartbeat", content=beat, headers=headers)).status_code == 422
    assert await redis.get(keys.heartbeat_key("b")) == before
    assert (await api.get("/workers")).status_code == 200


@pytest.mark.parametrize(
    "figures",
    [
        '"timings": {"queued_ms": NaN}',
        '"timings": {"inference_ms": -Infinity}',
        '"timings": {"first_token_ms": -1}',
        '"usage": {"completion_tokens": -100}',
        '"usage": {"prompt_tokens": 1e300}',
    ],
)
async def test_a_result_with_a_figure_json_cannot_hold_or_out_of_range_is_422_and_the_lease_holds(
    api: httpx.AsyncClient, redis: Redis, two_workers: tuple[dict[str, str], dict[str, str], Job], figures: str
) -> None:
    _, b, job = two_workers
    rid = job.request_id
    body = f'{{"request_id": "{rid}", "status": "completed", "model": "fake", "worker_id": "b", {figures}}}'
    headers = b | {"content-type": "application/json"}
    assert (await api.post(f"/worker/jobs/{rid}/result", content=body, headers=headers)).status_code == 422
    assert await redis.exists(keys.result_key(rid)) == 0
    assert (await api.get(f"/result/{rid}")).status_code == 202  # still running, still b's to finish
    assert (await api.post(f"/worker/jobs/{rid}/result", json=_result(job, "ok", "b"), headers=b)).status_code == 204
    assert (await api.get(f"/result/{rid}")).json()["output"] == "ok"


async def test_an_admin_revokes_a_live_worker_every_later_call_is_401_and_its_jobs_go_to_others(
    api: httpx.AsyncClient, redis: Redis, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    a, b, job = two_workers
    rid = job.request_id
    beat = WorkerBeat(heartbeat=Heartbeat(at=1.0, jobs_in_flight=1), running=[rid]).model_dump(mode="json")
    assert (await api.post("/worker/heartbeat", json=beat, headers=b)).status_code == 200
    assert (await api.delete("/admin/workers/b")).status_code == 409  # alive: removal needs it dead
    assert (await api.post("/admin/workers/b/revoke")).status_code == 204

    for method, path, body in [
        ("POST", "/worker/heartbeat", beat),
        ("POST", "/worker/take", None),
        ("POST", f"/worker/jobs/{rid}/stream", {"text": "late", "tokens": 1}),
        ("POST", f"/worker/jobs/{rid}/result", _result(job, "late", "b")),
        ("POST", "/worker/leave", None),
    ]:
        response = await api.request(method, path, json=body, headers=b)
        assert response.status_code == 401, (path, response.text)
    assert not await redis.exists(keys.heartbeat_key("b"))  # the refused beat did not bring it back
    assert {w["worker_id"]: w["state"] for w in (await api.get("/workers")).json()} == {"a": "alive", "b": "dead"}
    # The job b held goes to the other live worker, with an attempt counted.
    await Reaper(redis, 0.1, max_attempts=3, result_ttl_s=60, heartbeat_timeout_s=0).reap_once()
    handed = await _take(api, a)
    assert handed is not None and (handed.request_id, handed.attempt) == (rid, 2)
    assert (await api.delete("/admin/workers/b")).status_code == 204
    assert (await api.post("/admin/workers/nobody/revoke")).status_code == 404


async def test_a_beat_whose_credential_was_checked_before_the_secret_went_writes_nothing(
    redis: Redis, api: httpx.AsyncClient
) -> None:
    await _register(api, "b")
    await redis.delete(keys.worker_secret_key("b"), keys.heartbeat_key("b"))  # revoked between check and write
    assert await leases.beat(redis, "b", Heartbeat(at=1.0), 60.0, []) is None
    assert not await redis.exists(keys.heartbeat_key("b"))


async def test_a_worker_that_left_the_registry_has_no_credential_left(api: httpx.AsyncClient, redis: Redis) -> None:
    b = await _register(api, "b")
    assert (await api.post("/worker/leave", headers=b)).json() == {"left": True}
    beat = WorkerBeat(heartbeat=Heartbeat(at=1.0)).model_dump(mode="json")
    assert (await api.post("/worker/heartbeat", json=beat, headers=b)).status_code == 401
    assert not await redis.exists(keys.heartbeat_key("b"), keys.worker_secret_key("b"))
    assert (await api.get("/workers")).json() == []


async def test_a_worker_linked_through_the_coordinator_is_believed_a_plausible_speed_only(
    api: httpx.AsyncClient, two_workers: tuple[dict[str, str], dict[str, str], Job]
) -> None:
    a, b, _ = two_workers
    for headers, speed in [(a, 50.0), (b, 1e6)]:
        beat = WorkerBeat(heartbeat=Heartbeat(at=1.0, tokens_per_s=speed)).model_dump(mode="json")
        assert (await api.post("/worker/heartbeat", json=beat, headers=headers)).status_code == 200
    speeds = {w["worker_id"]: w["tokens_per_s"] for w in (await api.get("/workers")).json()}
    assert speeds == {"a": 50.0, "b": 2000.0}  # GPUTORRENT_MAX_WORKER_TOKENS_PER_S


async def test_a_worker_cannot_take_more_jobs_than_its_slots(api: httpx.AsyncClient, redis: Redis) -> None:
    c = await _register(api, "c")  # one slot
    first, second = await _submit(api, "one"), await _submit(api, "two")
    job = await _take(api, c)
    assert job is not None and job.request_id == first
    refused = await api.post("/worker/take", params={"wait_s": 0}, headers=c)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "slots_full" and refused.headers["retry-after"] == "1"
    assert await redis.llen(keys.processing_key("c")) == 1  # the second job still waits in the queue
    assert (await api.post(f"/worker/jobs/{first}/result", json=_result(job, "ok", "c"), headers=c)).status_code == 204
    taken = await _take(api, c)
    assert taken is not None and taken.request_id == second


async def test_a_worker_has_no_more_long_polls_in_flight_than_its_slots(api: httpx.AsyncClient) -> None:
    c = await _register(api, "c")  # one slot
    state = api._transport.app.state  # type: ignore[attr-defined]
    polling = asyncio.create_task(api.post("/worker/take", params={"wait_s": 5}, headers=c))

    async def in_flight() -> bool:
        takes: TakesInFlight | None = getattr(state, "worker_takes", None)
        return takes is not None and takes.count("c") == 1

    await eventually(in_flight, "the first take to wait")
    second = await api.post("/worker/take", params={"wait_s": 5}, headers=c)
    assert second.status_code == 429 and second.json()["error"]["code"] == "slots_full"
    rid = await _submit(api, "ends the first long poll")
    first = await polling
    assert first.status_code == 200 and Taken.model_validate_json(first.content).job.request_id == rid
    assert state.worker_takes.count("c") == 0


async def test_a_take_by_a_worker_no_longer_registered_is_410_worker_gone(api: httpx.AsyncClient, redis: Redis) -> None:
    c = await _register(api, "c")
    await redis.delete(keys.worker_key("c"))  # removed by hand (operations.md), its secret left behind
    response = await api.post("/worker/take", params={"wait_s": 0}, headers=c)
    assert response.status_code == 410 and response.json()["error"]["code"] == "worker_gone"
