"""What a worker registers with: its model, and where its backend can pull, every other model the backend has."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from gputorrent.errors import BackendUnavailable
from gputorrent.protocol import MAX_MODELS, PullProgress
from gputorrent.worker.backends.fake import FakeBackend
from gputorrent.worker.main import served_models


class Pulling(FakeBackend):
    """A backend that can pull and lists `listed` (or fails to, with `listed` None)."""

    can_pull = True

    def __init__(self, listed: list[str] | None) -> None:
        super().__init__()
        self.listed = listed

    async def list_models(self) -> list[str]:
        if self.listed is None:
            raise BackendUnavailable("Ollama at http://127.0.0.1:1 is unreachable")
        return self.listed

    async def pull(self, model: str, *, insecure: bool = False) -> AsyncGenerator[PullProgress]:
        yield PullProgress(status="success")


async def test_a_backend_that_cannot_pull_serves_its_model_alone() -> None:
    assert await served_models(FakeBackend(), "fake") == ["fake"]


async def test_a_backend_that_can_pull_serves_every_model_it_has_each_once() -> None:
    listed = ["qwen2.5:0.5b", "llama3.2:latest", "qwen2.5:0.5b", "gemma3:270m"]
    assert await served_models(Pulling(listed), "llama3.2") == ["llama3.2", "qwen2.5:0.5b", "gemma3:270m"]


async def test_listing_that_fails_leaves_the_model_alone(caplog: pytest.LogCaptureFixture) -> None:
    assert await served_models(Pulling(None), "llama3.2") == ["llama3.2"]
    assert "listing its other models failed: Ollama at http://127.0.0.1:1 is unreachable" in caplog.text


async def test_at_most_max_models_are_served(caplog: pytest.LogCaptureFixture) -> None:
    listed = [f"m{i}:latest" for i in range(MAX_MODELS + 5)]
    served = await served_models(Pulling(listed), "main")
    assert len(served) == MAX_MODELS and served[0] == "main" and served[1] == "m0:latest"
    assert f"has {MAX_MODELS + 6} models; the worker serves the first {MAX_MODELS}" in caplog.text
