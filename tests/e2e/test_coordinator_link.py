"""Workers without Redis credentials (`--link coordinator`) as real processes: they join with a join
key, serve every kind of job through the coordinator alone, and a killed one's jobs still fail over."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.protocol import JobResult
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, healthy, new_key, wait_for, wait_until_alive

NO_REDIS = "redis://127.0.0.1:1"  # nothing listens there: a worker that used Redis would fail


@dataclass
class Pool:
    url: str
    client_key: str
    start_worker: Callable[..., Process]


@pytest.fixture
def pool(processes: Callable[..., Process], redis_url: str) -> Iterator[Pool]:
    """A coordinator with authentication on; workers join it with a join key and no Redis URL."""
    client_key, join_key = new_key(redis_url, "client"), new_key(redis_url, "join")
    port = free_port()
    timing = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "3"}
    processes("coordinator", "--port", str(port), "--redis-url", redis_url, name="coordinator", env=timing)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: healthy(url), PROCESS_START_TIMEOUT_S, "the coordinator")

    def start_worker(worker_id: str, env: dict[str, str] | None = None) -> Process:
        worker = processes(
            "worker", "--link", "coordinator", "--backend", "fake", "--coordinator", url, "--worker-id", worker_id,
            name=f"worker-{worker_id}", env={"GPUTORRENT_JOIN_TOKEN": join_key, "REDIS_URL": NO_REDIS, **(env or {})},
        )  # fmt: skip
        wait_until_alive(worker, worker_id, url, client_key)
        return worker

    yield Pool(url=url, client_key=client_key, start_worker=start_worker)


def _stream(pool: Pool, body: dict[str, object], on_token: Callable[[int], None] = lambda n: None) -> list[dict]:  # type: ignore[type-arg]
    """POST /inference with `stream: true`; every event's data, `on_token` called with the tokens seen so far."""
    events = []
    headers = {"Authorization": f"Bearer {pool.client_key}"}
    with httpx.stream("POST", f"{pool.url}/inference", json=body | {"stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append({"event": event, **json.loads(line.removeprefix("data: "))})
                if event == "token":
                    on_token(sum(e["event"] == "token" for e in events))
    return events


def test_a_worker_without_redis_serves_plain_streamed_and_openai_jobs(pool: Pool) -> None:
    worker = pool.start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.01"})
    with APIClient(pool.url, api_key=pool.client_key) as client:
        result = client.infer("fake", "one two three")
        assert (result.status, result.output, result.worker_id) == ("completed", "echo: one two three", "w1")

    events = _stream(pool, {"model": "fake", "prompt": "a b c d e"})
    assert events[0]["event"] == "queued" and events[-1]["event"] == "result"
    tokens = "".join(e["text"] for e in events if e["event"] == "token")
    assert tokens == events[-1]["output"] == "echo: a b c d e"

    with openai.OpenAI(base_url=f"{pool.url}/v1", api_key=pool.client_key, max_retries=0) as oa:
        chunks = oa.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi there"
    worker.stop()
    assert "Traceback" not in worker.log
    assert "left the pool" in worker.log


def test_a_cancelled_job_stops_on_a_worker_without_redis(pool: Pool) -> None:
    pool.start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.2"})  # 40 words: 8 s
    with APIClient(pool.url, api_key=pool.client_key) as client:
        accepted = client.submit("fake", " ".join(["word"] * 39))
        wait_for(lambda: getattr(client.result(accepted.request_id), "status", "") == "running", 10, "the job to run")
        cancelled = client.cancel(accepted.request_id)
        assert cancelled.error is not None and cancelled.error.code == "cancelled"
        # The worker hears it from its next heartbeat's answer and is free again well before 8 s.
        assert client.infer("fake", "next please", timeout_s=5).output == "echo: next please"


def test_a_killed_worker_without_redis_loses_no_token_of_its_stream(pool: Pool) -> None:
    doomed = pool.start_worker("w1", env={"GPUTORRENT_FAKE_TOKEN_DELAY_S": "0.2"})
    words = " ".join(f"w{i}" for i in range(30))
    replacement: list[Process] = []

    def kill_after_some_tokens(seen: int) -> None:
        if seen == 3 and not replacement:
            doomed.signal(signal.SIGKILL)
            replacement.append(pool.start_worker("w2"))  # the reaper hands the job on once w1's heartbeat expires

    events = _stream(pool, {"model": "fake", "prompt": words, "options": {"temperature": 0}}, kill_after_some_tokens)
    result = JobResult.model_validate({k: v for k, v in events[-1].items() if k != "event"})
    assert (result.status, result.worker_id) == ("completed", "w2")
    assert result.resumed is not None and result.resumed.after_tokens >= 3
    streamed = "".join(e["text"] for e in events if e["event"] == "token")
    assert streamed == result.output == f"echo: {words}"  # nothing lost, nothing repeated
