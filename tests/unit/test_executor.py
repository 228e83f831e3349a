"""How a job's outcome becomes a result, with hand-made backends at the edges of what they may return."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest

from gputorrent.protocol import (
    Embeddings,
    GenerationDone,
    InferenceOptions,
    Job,
    JobResult,
    PullProgress,
    TokenChunk,
)
from gputorrent.streams import StreamWriter
from gputorrent.worker.executor import execute


class _NonFiniteEmbedder:
    name = "non-finite"
    replays_exactly = False

    async def load(self, model: str | None) -> str:
        return "m"

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        yield GenerationDone(prompt_tokens=0, completion_tokens=0)

    async def embed(self, job: Job) -> Embeddings:
        return Embeddings(vectors=[[0.5, float("nan")]], prompt_tokens=1)

    async def list_models(self) -> list[str]:
        return ["m"]

    async def close(self) -> None:
        return None


async def test_an_embedding_with_non_finite_values_fails_the_job() -> None:
    job = Job(
        request_id="r", worker_id="w", model="m", kind="embed", input=["x"], options=InferenceOptions(),
        enqueued_at=time.time(),
    )  # fmt: skip
    result = await execute(_NonFiniteEmbedder(), job)
    assert result.status == "failed"
    assert result.error is not None and result.error.code == "backend_error"
    assert result.embeddings is None


class _Puller(_NonFiniteEmbedder):
    """Pulls by yielding `lines` progress lines; records how far the consumer read."""

    name = "puller"
    can_pull = True

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.read = 0
        self.closed = False

    async def pull(self, model: str, *, insecure: bool = False) -> AsyncGenerator[PullProgress]:
        try:
            for i in range(self.lines):
                self.read = i + 1
                yield PullProgress(status=f"pulling {model}", digest="sha256:ab", total=self.lines, completed=i)
        finally:
            self.closed = True


def _pull_job(**fields: object) -> Job:
    return Job(request_id="r", worker_id="w", model="m", kind="pull", enqueued_at=time.time(), **fields)  # type: ignore[arg-type]


async def test_a_pull_job_on_a_backend_that_cannot_pull_fails_naming_the_backend() -> None:
    result = await execute(_NonFiniteEmbedder(), _pull_job())
    assert result.status == "failed" and result.error is not None
    assert (result.error.code, result.error.message) == ("backend_error", "the non-finite backend cannot pull models")


async def test_a_pull_writes_each_progress_line_and_stops_at_the_next_once_ended() -> None:
    written: list[str] = []

    async def append(text: str, tokens: int) -> bool:
        written.append(text)
        return True

    writer = StreamWriter(append)
    result = await execute(_Puller(lines=3), _pull_job(stream=True), writer)
    await writer.close()  # as the worker does before it stores the result
    assert result.status == "completed" and result.output is None
    lines = [PullProgress.model_validate_json(line) for line in "".join(written).splitlines()]
    assert [line.completed for line in lines] == [0, 1, 2]

    ended = asyncio.Event()
    ended.set()
    stopped = _Puller(lines=100)
    result = await execute(stopped, _pull_job(stream=True), StreamWriter(append), ended)
    assert result.status == "failed" and result.error is not None and result.error.code == "cancelled"
    assert stopped.read == 1 and stopped.closed  # the backend's pull was closed at once


async def test_a_formatted_stream_is_not_continued_after_another_workers_text() -> None:
    """The backend's constraint would start again after the text it did not write: refused, not broken JSON."""
    generated: list[Job] = []

    class _Recorder(_NonFiniteEmbedder):
        async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
            generated.append(job)
            yield GenerationDone(prompt_tokens=0, completion_tokens=0)

    job = Job(
        request_id="r", worker_id="w", model="m", stream=True, enqueued_at=time.time(),
        options=InferenceOptions(format="json"), continuation='{"name": "A', continuation_tokens=4,
    )  # fmt: skip
    result = await execute(_Recorder(), job)
    assert result.status == "failed" and result.error is not None
    assert result.error.code == "backend_error" and "cannot be continued" in result.error.message
    assert generated == []  # the backend never ran

    unformatted = await execute(_Recorder(), job.model_copy(update={"options": InferenceOptions()}))
    assert unformatted.status == "completed" and len(generated) == 1


class _Scripted(_NonFiniteEmbedder):
    """Answers a fresh run with `fresh` (its words as tokens) and a continuation with `after`; records
    every job it was given."""

    def __init__(self, fresh: str, after: str, *, replays_exactly: bool) -> None:
        self.fresh, self.after, self.replays_exactly = fresh, after, replays_exactly
        self.jobs: list[Job] = []

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        self.jobs.append(job)
        words = (self.after if job.continuation else self.fresh).split(" ")
        for i, word in enumerate(words):
            yield TokenChunk(text=word if i == 0 and not job.continuation else f" {word}")
        yield GenerationDone(prompt_tokens=3, completion_tokens=len(words), finish_reason="stop")


async def _resume(backend: _Scripted, temperature: float = 0.0) -> tuple[JobResult, str]:
    """Run a streamed job whose earlier attempt sent "alpha beta" (2 tokens); the result and the text pushed."""
    pushed: list[str] = []

    async def append(text: str, tokens: int) -> bool:
        pushed.append(text)
        return True

    job = Job(
        request_id="r", worker_id="w", model="m", prompt="p", stream=True, enqueued_at=time.time(),
        options=InferenceOptions(temperature=temperature, max_tokens=10), continuation="alpha beta",
        continuation_tokens=2,
    )  # fmt: skip
    writer = StreamWriter(append)
    result = await execute(backend, job, writer, replay_max_tokens=64)
    await writer.close()
    return result, "".join(pushed)


async def test_a_resumed_greedy_stream_whose_replay_writes_the_text_sent_is_exact() -> None:
    backend = _Scripted("alpha beta gamma", "never", replays_exactly=True)
    result, pushed = await _resume(backend)
    assert (result.output, pushed) == ("alpha beta gamma", " gamma")
    assert result.resumed is not None and result.resumed.exact
    assert [job.continuation for job in backend.jobs] == [None]  # run again from the start
    assert result.usage.completion_tokens == 3  # the whole answer's, as one uninterrupted run counts


async def test_a_resumed_stream_whose_replay_differs_continues_from_the_text_sent_and_is_not_exact() -> None:
    backend = _Scripted("alpha gamma delta", "epsilon", replays_exactly=True)
    result, pushed = await _resume(backend)
    assert (result.output, pushed) == ("alpha beta epsilon", " epsilon")  # nothing of the replay was sent
    assert result.resumed is not None and not result.resumed.exact and "differed" in result.resumed.note
    assert [job.continuation for job in backend.jobs] == [None, "alpha beta"]


async def test_a_replay_that_ends_before_the_text_sent_is_a_difference_too() -> None:
    result, pushed = await _resume(_Scripted("alpha", "epsilon", replays_exactly=True))
    assert (result.output, pushed) == ("alpha beta epsilon", " epsilon")
    assert result.resumed is not None and not result.resumed.exact


@pytest.mark.parametrize(
    ("replays_exactly", "temperature", "note"),
    [(False, 0.0, "does not reproduce"), (True, 0.7, "temperature above 0")],
    ids=["backend-cannot-replay", "sampled"],
)
async def test_a_resumed_stream_that_cannot_be_replayed_continues_from_its_text_and_says_why(
    replays_exactly: bool, temperature: float, note: str
) -> None:
    backend = _Scripted("never", "epsilon", replays_exactly=replays_exactly)
    result, pushed = await _resume(backend, temperature)
    assert (result.output, pushed) == ("alpha beta epsilon", " epsilon")
    assert result.resumed is not None and not result.resumed.exact and note in result.resumed.note
    assert len(backend.jobs) == 1
