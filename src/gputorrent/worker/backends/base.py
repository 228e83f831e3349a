"""The one interface every inference backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from gputorrent.protocol import Embeddings, GenerationDone, Job, TokenChunk


class Backend(Protocol):
    """An inference engine a worker drives. It knows nothing of Redis or HTTP frameworks."""

    name: str

    async def load(self, model: str | None) -> str:
        """Make `model` ready (pulling it where the backend can) and return the name it is served as.

        Raises:
            ModelUnavailable: the model cannot be found or fetched.
        """
        ...

    def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        """Run the job's prompt or chat; yield text, then exactly one `GenerationDone`.

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
