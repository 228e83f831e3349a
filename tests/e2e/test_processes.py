"""The pool as real processes: a coordinator and fake-backend workers on a real Redis, driven by the client and CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from gputorrent.client import APIClient, AsyncAPIClient
from gputorrent.errors import JobFailed, ModelNotFound, ServiceUnavailable
from gputorrent.protocol import JobResult
from gputorrent.worker.backends.fake import FAIL_TRIGGER
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, alive_workers, wait_for

StartWorker = Callable[..., Process]


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gputorrent", *args, "--url", url], capture_output=True, text=True, timeout=60
    )


def test_client_infer_through_coordinator_and_worker_processes(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    with APIClient(coordinator_url) as client:
        result = client.infer("fake", "hello from the client", options={"max_tokens": 3})
    assert result.status == "completed"
    assert result.output == "echo: hello from"
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 3
    assert result.worker_id == "w1"


def test_client_retries_with_its_request_id_get_one_job_and_cancel_ends_it(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.05"})
    words = " ".join(["word"] * 400)  # 20 s of tokens
    with APIClient(coordinator_url) as client:
        first = client.submit("fake", words, options={"max_tokens": 1000}, request_id="client-retry-0001")
        again = client.submit("fake", words, options={"max_tokens": 1000}, request_id="client-retry-0001")
        assert (first.request_id, first.replayed, again.replayed) == ("client-retry-0001", False, True)
        wait_for(lambda: _status(client, first.request_id) == "running", 10, "the job to start")
        ended = client.cancel(first.request_id)
        assert ended.status == "failed" and ended.error is not None and ended.error.code == "cancelled"
        follow_up = client.infer("fake", "next please", timeout_s=5)  # only if the cancelled job stopped
        assert follow_up.output == "echo: next please"


def _status(client: APIClient, request_id: str) -> str:
    return client.result(request_id).status


def test_jobs_submitted_together_are_spread_over_two_worker_processes(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    paced = {"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.05"}  # jobs last long enough to be queued side by side
    start_worker("w1", env=paced)
    start_worker("w2", env=paced)
    with APIClient(coordinator_url) as client:
        accepted = [client.submit("fake", f"job {i} " + "word " * 10) for i in range(4)]
        served_by = [_completed(client, a.request_id).worker_id for a in accepted]
    assert sorted(served_by) == ["w1", "w1", "w2", "w2"]  # the default policy (least loaded) balances them


def _completed(client: APIClient, request_id: str) -> JobResult:
    found = client.result(request_id, wait_s=30)
    assert isinstance(found, JobResult), found
    return found


def test_client_raises_the_api_errors_as_exceptions(coordinator_url: str, start_worker: StartWorker) -> None:
    with APIClient(coordinator_url) as client:
        with pytest.raises(ServiceUnavailable, match="no live worker"):
            client.submit("fake", "p")
        start_worker("w1")
        with pytest.raises(ModelNotFound) as caught:
            client.submit("nope", "p")
        assert caught.value.details["available_models"] == ["fake"]
        with pytest.raises(JobFailed) as failed:
            client.infer("fake", f"x {FAIL_TRIGGER}")
        assert failed.value.code == "backend_error"
    with APIClient("http://127.0.0.1:1") as unreachable, pytest.raises(ServiceUnavailable, match="cannot reach"):
        unreachable.workers()


async def test_async_client_submits_and_waits(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    async with AsyncAPIClient(coordinator_url) as client:
        accepted = await client.submit("fake", messages=[{"role": "user", "content": "hi async"}])
        result = await client.result(accepted.request_id, wait_s=20)
        assert isinstance(result, JobResult)
        assert result.output == "echo: hi async"
        [worker] = await client.workers()
        assert worker.worker_id == "w1"
        assert worker.hardware.gpus or (worker.hardware.cpu_cores or 0) > 0  # a CPU box reports cores and RAM
        assert worker.hardware.gpus or (worker.hardware.ram_total_bytes or 0) > 0
        assert await client.health() == {"status": "healthy", "redis": "connected"}


def test_cli_infer_prints_the_answer_and_workers_prints_a_table(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1")
    infer = _cli("infer", "hello cli", "--model", "fake", url=coordinator_url)
    assert infer.returncode == 0, infer.stderr
    assert infer.stdout.strip() == "echo: hello cli"
    table = _cli("workers", url=coordinator_url)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["WORKER", "STATE", "BACKEND"]
    assert row.split()[:4] == ["w1", "alive", "fake", "fake"]
    unknown = _cli("infer", "x", "--model", "nope", url=coordinator_url)
    assert unknown.returncode == 1
    assert "model_not_found" in unknown.stderr


def test_sigterm_makes_an_idle_worker_leave_the_pool_at_once(coordinator_url: str, start_worker: StartWorker) -> None:
    worker = start_worker("w1")
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=15) == 0, worker.log
    assert httpx.get(f"{coordinator_url}/workers").json() == []  # deregistered; no wait for a heartbeat to expire
    assert "w1 left the pool after 0 jobs" in worker.log


def test_a_killed_worker_is_declared_dead_when_its_heartbeat_expires(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    worker = start_worker("w1")
    worker.signal(signal.SIGKILL)
    worker.popen.wait(timeout=10)
    wait_for(lambda: alive_workers(coordinator_url) == [], 10, "the heartbeat (4 s TTL) to expire")


def test_a_worker_that_cannot_reach_the_coordinator_exits_with_a_clear_error(
    processes: Callable[..., Process], redis_url: str
) -> None:
    proc = processes(
        "worker", "--backend", "fake", "--coordinator", "http://127.0.0.1:1", "--redis-url", redis_url,
        env={"GPUTORRENT_REGISTER_TIMEOUT_S": "1"}, name="lonely-worker",
    )  # fmt: skip
    assert proc.popen.wait(timeout=PROCESS_START_TIMEOUT_S) == 1
    assert "cannot reach the coordinator at http://127.0.0.1:1" in proc.log
    assert "Traceback" not in proc.log


def test_native_stream_sends_queued_then_tokens_then_the_result(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.05"})
    body = {"model": "fake", "prompt": "one two three four", "stream": True}
    events: list[tuple[str, dict[str, object]]] = []
    with httpx.stream("POST", f"{coordinator_url}/inference", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "result"
    assert set(names[1:-1]) == {"token"} and len(names) >= 4
    result = events[-1][1]
    assert "".join(str(data["text"]) for name, data in events if name == "token") == result["output"]
    stored = httpx.get(f"{coordinator_url}/result/{result['request_id']}").json()
    # The same result, but for its overhead: the stream's is its request's time less inference, a
    # later read's the parts the job recorded (see coordinator/overhead.py).
    for timings in (stored["timings"], result["timings"]):
        assert isinstance(timings, dict)
        del timings["overhead_ms"]
    assert stored == result


def test_a_job_survives_kill_9_of_its_worker_and_completes_on_another(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    doomed = start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.5"})  # 20 tokens: 10 s
    start_worker("w2")
    with APIClient(coordinator_url) as client:
        accepted = client.submit("fake", " ".join(["word"] * 19))
        assert accepted.worker_id == "w1"  # round-robin's first pick, in id order
        wait_for(
            lambda: getattr(client.result(accepted.request_id), "status", "") == "running", 10, "w1 to start the job"
        )
        doomed.signal(signal.SIGKILL)
        result = client.result(accepted.request_id, wait_s=30)  # heartbeat timeout (4 s) + a reaper round + work
    assert isinstance(result, JobResult)
    assert result.status == "completed"
    assert result.worker_id == "w2"
    assert result.output == "echo: " + " ".join(["word"] * 19)
