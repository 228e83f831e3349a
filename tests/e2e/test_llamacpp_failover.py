"""kill -9 of a llama.cpp worker mid-stream on the packaged model, at several points of a greedy
answer: another worker finishes the stream, and `resumed.exact` is checked against a reference run
(it must be true only where the text is the uninterrupted run's, token for token)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.conftest import Process, StreamReader, wait_for

pytestmark = pytest.mark.model

MODEL = "gemma3:270m"
BODY = {
    "model": MODEL,
    "prompt": "The history of the Roman Empire is long and complicated. It was founded",
    "stream": True,
    "options": {"max_tokens": 120, "temperature": 0},
}
KILL_AFTER_TOKENS = (2, 40, 90)  # early, middle and late in the answer


def _read_whole(url: str) -> StreamReader:
    reader = StreamReader(url, BODY)
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
    reader = StreamReader(url, BODY)
    reader.start()
    wait_for(lambda: bool(reader.events), 30, "the queued event")
    first = str(reader.events[0][1]["worker_id"])
    wait_for(lambda: reader.tokens() >= kill_after, 60, f"{kill_after} tokens from worker {first}")
    workers[first].signal(signal.SIGKILL)
    workers[first].popen.wait(timeout=10)
    reader.join(timeout=120)
    assert not reader.is_alive(), "the stream never ended"
    return reader, first
