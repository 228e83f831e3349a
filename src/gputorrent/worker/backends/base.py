"""The one interface every inference backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

from gputorrent.protocol import Embeddings, GenerationDone, Job, PullProgress, TokenChunk


class Backend(Protocol):
    """An inference engine a worker drives. It knows nothing of Redis or HTTP frameworks."""

    name: str
    # A reproducible request (greedy or seeded) run again gives the same text: a stream that lost its
    # worker is then replayed and checked rather than continued from its text (worker/executor.py).
    replays_exactly: bool

    async def load(self, model: str | None) -> str:
        """Make `model` ready (pulling it where the backend can) and return the name it is served as.

        Raises:
            ModelUnavailable: the model cannot be found or fetched.
        """
        ...

    def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        """Run the job's prompt or chat; yield text, then exactly one `GenerationDone`.

        A job with a `continuation` already has that much of its answer: yield only what follows it.

        Raises:
            BackendError: the engine failed; the message is safe to show the client.
        """
        ...

    async def embed(self, job: Job) -> Embeddings:
        """One vector per text in `job.input`, and the tokens they took.

        Raises:
            BackendError: the engine failed or cannot embed with this model.
        """
        ...

    async def list_models(self) -> list[str]:
        """The models this backend can serve now."""
        ...

    async def close(self) -> None:
        """Release the engine's resources."""
        ...


@runtime_checkable
class Puller(Protocol):
    """A backend that can fetch a model it does not have yet, while it runs: Ollama's from its registry,
    llama.cpp's from the pool's swarm. A worker whose backend is one (and `can_pull`) registers with `can_pull`."""

    can_pull: bool  # False: it could, but not here (llama.cpp with the swarm off)

    def pull(self, model: str, *, insecure: bool = False) -> AsyncGenerator[PullProgress]:
        """Fetch `model`, yielding the engine's progress as it goes; returns once the model is ready.

        Raises:
            ModelUnavailable: the model cannot be found or fetched.
            BackendUnavailable: the engine cannot be reached.
        """
        ...


def puller(backend: Backend) -> Puller | None:
    """The backend as a `Puller`, if it can pull here."""
    return backend if isinstance(backend, Puller) and backend.can_pull else None


def continued_chat(job: Job) -> list[dict[str, Any]]:
    """The job as chat messages for an HTTP backend; a continuation is a final assistant turn, which
    Ollama and llama.cpp's server carry on from (a prompt job becomes one user turn)."""
    if job.messages is not None:
        messages = [m.model_dump() for m in job.messages]
    else:
        messages = [{"role": "user", "content": job.prompt or ""}]
    if job.continuation:
        messages.append({"role": "assistant", "content": job.continuation})
    return messages
