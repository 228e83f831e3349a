"""Observability on real processes: /metrics and /pool/events of a live pool, request ids in the logs of
coordinator and worker, and `gputorrent status`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, alive_workers, wait_for

StartWorker = Callable[..., Process]


def _samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_counters_move_after_a_request(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    admitted = ("gputorrent_requests_total", frozenset({("route", "/inference"), ("model", "fake"), ("status", "202")}))
    jobs = ("gputorrent_jobs_total", frozenset({("worker", "w1"), ("model", "fake"), ("status", "completed")}))
    tokens = ("gputorrent_tokens_generated_total", frozenset({("worker", "w1"), ("model", "fake")}))
    before = _samples(coordinator_url)
    assert before.get(admitted, 0) == 0 and before.get(jobs, 0) == 0

    with APIClient(coordinator_url) as client:
        result = client.infer("fake", "one two three", options={"max_tokens": 8})

    assert _samples(coordinator_url)[admitted] == 1
    # The worker's counters reach the coordinator with its next heartbeat (every 0.5 s here).
    wait_for(lambda: _samples(coordinator_url).get(jobs) == 1, 10, "the worker's heartbeat to carry the job")
    after = _samples(coordinator_url)
    assert after[tokens] == result.usage.completion_tokens == 4
    latency = frozenset({("worker", "w1"), ("model", "fake")})
    assert after[("gputorrent_request_latency_seconds_count", latency)] == 1
    assert after[("gputorrent_queue_wait_seconds_count", latency)] == 1
    assert after[("gputorrent_workers", frozenset({("state", "alive")}))] == 1
    assert after[("gputorrent_worker_ram_total_bytes", frozenset({("worker", "w1")}))] > 0


def _pool_events(url: str, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/pool/events", params={"interval_s": 0.5, "history_s": 60}, timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name == "pool"
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) == count:
                    break
    return events


def test_pool_events_send_the_overview_again_and_again(coordinator_url: str, start_worker: StartWorker) -> None:
    start_worker("w1")
    first, second = _pool_events(coordinator_url, 2)
    assert second["at"] > first["at"]
    [worker] = second["workers"]
    assert (worker["worker_id"], worker["state"]) == ("w1", "alive")
    assert worker["telemetry"]["machine"]["ram_total_bytes"] > 0
    assert second["totals"]["slots"] == 1
    assert [m["model"] for m in second["models"]] == ["fake"]


def _json_lines(proc: Process) -> list[dict[str, Any]]:
    lines = [line for line in proc.log.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON, uvicorn's own included


def test_one_request_can_be_followed_across_coordinator_and_worker_json_logs(
    processes: Callable[..., Process], redis_url: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    coordinator = processes("--log-format", "json", "coordinator", "--port", str(port), "--redis-url", redis_url,
                            env={"GPUTORRENT_AUTH": "off"}, name="coordinator")  # fmt: skip
    worker = processes("worker", "--backend", "fake", "--coordinator", url, "--redis-url", redis_url, "--worker-id",
                       "w1", env={"GPUTORRENT_LOG_FORMAT": "json"}, name="worker")  # fmt: skip
    wait_for(lambda: "w1" in alive_workers(url) or worker.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "w1")

    with APIClient(url) as client:
        result = client.infer("fake", "follow me")
    coordinator.stop()
    worker.stop()

    for proc in (coordinator, worker):
        tagged = [line for line in _json_lines(proc) if line.get("request_id") == result.request_id]
        assert tagged, proc.log
        assert all({"time", "level", "logger", "message"} <= line.keys() for line in tagged)
    worker_messages = [m["message"] for m in _json_lines(worker) if m.get("request_id") == result.request_id]
    assert any("started" in m for m in worker_messages) and any("completed" in m for m in worker_messages)


def _status(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gputorrent", "status", "--url", url, *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT handled by default in the child, as a terminal's Ctrl-C finds it. A test run started in
    the background by a shell without job control inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_status_prints_the_pool_and_watch_refreshes_until_ctrl_c(
    coordinator_url: str, start_worker: StartWorker
) -> None:
    start_worker("w1")
    once = _status(url=coordinator_url)
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert lines[1].startswith("workers: 1 alive of 1 | slots busy 0/1")
    assert lines[2].startswith("last 60 s: ")
    row = next(line for line in lines if line.startswith("w1 "))
    assert row.split()[:6] == ["w1", "alive", "fake", "fake", "0/1", "0"] and "CPU" in row

    watch = subprocess.Popen(
        [sys.executable, "-m", "gputorrent", "status", "--url", coordinator_url, "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    assert watch.stdout is not None
    frames = 0
    for line in watch.stdout:  # one "refreshing" line ends each frame
        frames += line.startswith("(refreshing every 0.2 s")
        if frames == 2:
            break
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=10) == 0, watch.stderr.read() if watch.stderr else ""
    watch.stdout.close()
    if watch.stderr:
        watch.stderr.close()

    unreachable = _status(url="http://127.0.0.1:1")
    assert unreachable.returncode == 1 and "cannot reach the coordinator" in unreachable.stderr
