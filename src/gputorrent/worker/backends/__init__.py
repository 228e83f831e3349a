"""Backend construction: one factory per name, no plugin system."""

from __future__ import annotations

from gputorrent.config import WorkerSettings
from gputorrent.errors import ModelUnavailable
from gputorrent.worker.backends.base import Backend, Puller, puller


def make_backend(settings: WorkerSettings, worker_id: str) -> Backend:
    """The backend `settings.backend` names, configured from the settings (`worker_id` names a split
    model's group)."""
    if settings.split is not None and settings.backend != "llamacpp":
        raise ModelUnavailable(f"--split needs --backend llamacpp (this worker's is {settings.backend})")
    if settings.backend == "llamacpp" and settings.split is not None:
        from gputorrent.worker.backends.split import SplitBackend

        return SplitBackend(settings, group=worker_id)
    if settings.backend == "llamacpp":
        from gputorrent.worker.backends.llamacpp import LlamaCppBackend
        from gputorrent.worker.model_swarm import ModelSwarm

        return LlamaCppBackend(
            n_ctx=settings.n_ctx, n_gpu_layers=settings.n_gpu_layers, models_dir=settings.models_dir,
            swarm=ModelSwarm.open(settings),
        )  # fmt: skip
    if settings.backend == "ollama":
        from gputorrent.worker.backends.ollama import OllamaBackend

        return OllamaBackend(host=settings.ollama_host)
    if settings.backend == "openai":
        from gputorrent.worker.backends.openai import OpenAIBackend

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIBackend(base_url=settings.openai_base_url, api_key=key)
    from gputorrent.worker.backends.fake import FakeBackend

    return FakeBackend(token_delay_s=settings.fake_token_delay_s, down_file=settings.fake_down_file)


__all__ = ["Backend", "Puller", "make_backend", "puller"]
