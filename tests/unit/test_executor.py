"""How a job's outcome becomes a result, with hand-made backends at the edges of what they may return."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from gputorrent.protocol import Embeddings, GenerationDone, InferenceOptions, Job, TokenChunk
from gputorrent.worker.executor import execute


class _NonFiniteEmbedder:
    name = "non-finite"

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
