"""A deterministic echo backend for tests and benchmarks; it never loads a model.

The output is `echo: ` followed by the prompt (or the last message), cut to `max_tokens`
words, one word per token, so tests can predict it exactly (a `format` is not followed: the echo
is never JSON). `token_delay_s` paces the tokens so a test can watch a stream arrive or cancel it
half-way; it is 0 unless a test sets it.

Test switches: two triggers matched anywhere in the prompt (or the last message), and a file.

- `FAIL_TRIGGER` (`__fail__`): the generation fails with a `BackendError`, to exercise the failure path.
- `down_file` (`GPUTORRENT_FAKE_DOWN_FILE`): while that file exists, every generation fails as an
  unreachable backend would (`BackendUnavailable`), so health checks and fail-over can be tested on
  real processes.
- `CRASH_TRIGGER` (`__crash__`): the whole worker process exits at once (`os._exit(1)`, no cleanup),
  as a job that crashes its engine would. The fault suite (tests/faults) uses it for a poison job
  that kills every worker it is handed to. Never put it in a prompt sent to a worker you want to keep.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncGenerator
from pathlib import Path

from gputorrent.errors import BackendError, BackendUnavailable
from gputorrent.protocol import Embeddings, GenerationDone, Job, TokenChunk

EMBEDDING_SIZE = 8
FAIL_TRIGGER = "__fail__"  # a prompt containing this fails, to exercise the failure path
CRASH_TRIGGER = "__crash__"  # a prompt containing this kills the worker process (fault suite's poison job)


class FakeBackend:
    name = "fake"
    replays_exactly = True  # the echo is the same every time

    def __init__(self, token_delay_s: float = 0.0, down_file: str | None = None) -> None:
        self._model = "fake"
        self._token_delay_s = token_delay_s
        self._down_file = Path(down_file) if down_file else None

    async def load(self, model: str | None) -> str:
        self._model = model or "fake"
        return self._model

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        text = job.prompt if job.prompt is not None else (job.messages or [])[-1].content
        if FAIL_TRIGGER in text:
            raise BackendError("the fake backend was asked to fail")
        if self._down_file is not None and self._down_file.exists():
            raise BackendUnavailable(f"the fake backend is down ({self._down_file} exists): connection refused")
        if CRASH_TRIGGER in text:
            os._exit(1)  # no cleanup, no result: like a backend that takes its process down
        words = ["echo:", *text.split()]
        start = len(job.continuation.split()) if job.continuation else 0  # a continuation is the echo's first words
        emitted = words[start : start + job.options.max_tokens]
        for i, word in enumerate(emitted, start):
            if self._token_delay_s:
                await asyncio.sleep(self._token_delay_s)  # a set pace, so tests can watch a stream arrive
            yield TokenChunk(text=word if i == 0 else f" {word}")
        finish_reason = "length" if len(words) > start + len(emitted) else "stop"
        yield GenerationDone(
            prompt_tokens=len(text.split()), completion_tokens=len(emitted), finish_reason=finish_reason
        )

    async def embed(self, job: Job) -> Embeddings:
        """Eight numbers per text from its SHA-256: the same text always gives the same vector."""
        texts = job.input or []
        vectors = [[byte / 255 for byte in hashlib.sha256(text.encode()).digest()[:EMBEDDING_SIZE]] for text in texts]
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(t.split()) for t in texts))

    async def list_models(self) -> list[str]:
        return [self._model]

    async def close(self) -> None:
        return None
