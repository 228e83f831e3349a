"""kill -9 of a llama.cpp worker mid-stream on the packaged model, at several points of a greedy
answer: another worker finishes the stream, and `resumed.exact` is checked against a reference run
(it must be true only where the text is the uninterrupted run's, token for token)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Process, wait_for

pytestmark = pytest.mark.model

MODEL = "gemma3:270m"
BODY = {
    "model": MODEL,
    "prompt": "The history of the Roman Empire is long and complicated. It was founded",
    "stream": True,
    "options": {"max_tokens": 120, "temperature": 0},
}
KILL_AFTER_TOKENS = (2, 40, 90)  # early, middle and late in the answer


class StreamReader(threading.Thread):
    """One client reading a native SSE stream to its end, keeping every event in order."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[str, dict[str, object]]] = []

    def run(self) -> None:
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{self.url}/inference", json=BODY) as reply:
            event = ""
            for line in reply.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((event, json.loads(line.removeprefix("data: "))))

    def tokens(self) -> int:
        return sum(1 for event, _ in self.events if event == "token")

    def text(self) -> str:
        return "".join(str(data["text"]) for event, data in self.events if event == "token")

    def result(self) -> dict[str, object]:
        event, data = self.events[-1]
        assert event == "result", self.events[-3:]
        return data


def _read_whole(url: str) -> StreamReader:
    reader = StreamReader(url)
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "the stream never ended"
    return reader


def test_a_greedy_stream_killed_mid_way_is_finished_exactly_and_says_so(
    coordinator_url: str, start_worker: Callable[..., Process]
) -> None:
    workers = {worker_id: start_worker(worker_id, "--model", MODEL, backend="llamacpp") for worker_id in ("a", "b")}
    reference = _read_whole(coordinator_url)
    assert reference.result()["resumed"] is None
    assert reference.tokens() > max(KILL_AFTER_TOKENS) + 10  # the answer runs past the last kill point

    for kill_after in KILL_AFTER_TOKENS:
        reader, killed = _kill_its_worker_mid_stream(coordinator_url, workers, kill_after)
        result = reader.result()
        resumed = result["resumed"]
        assert isinstance(resumed, dict), result
        assert result["worker_id"] != killed
        assert reader.text() == result["output"]  # the client's stream: nothing lost, nothing repeated
        assert resumed["exact"] == (result["output"] == reference.result()["output"]), resumed
        assert resumed["exact"], f"after {resumed['after_tokens']} tokens: {resumed['note']}"
        workers[killed] = start_worker(killed, "--model", MODEL, backend="llamacpp")  # the pool is whole again


def _kill_its_worker_mid_stream(url: str, workers: dict[str, Process], kill_after: int) -> tuple[StreamReader, str]:
    """Stream the request, kill -9 its worker once the client has `kill_after` tokens, and read the
    stream to its end; the reader and the killed worker's id."""
    reader = StreamReader(url)
    reader.start()
    wait_for(lambda: bool(reader.events), 30, "the queued event")
    first = str(reader.events[0][1]["worker_id"])
    wait_for(lambda: reader.tokens() >= kill_after, 60, f"{kill_after} tokens from worker {first}")
    workers[first].signal(signal.SIGKILL)
    workers[first].popen.wait(timeout=10)
    reader.join(timeout=120)
    assert not reader.is_alive(), "the stream never ended"
    return reader, first
