"""One model over several machines: llama.cpp's `llama-server` on the leader, with its layers on shard
hosts (`gputorrent shard`, each a `ggml-rpc-server`) that the coordinator assigns, through llama.cpp's
RPC backend (`--rpc`). To the rest of the pool the leader is an ordinary worker: jobs reach
`llama-server` through the OpenAI-compatible backend.

The group re-forms itself. `llama-server` aborts when a shard host dies and hangs when its link is
cut; the leader turns unhealthy (its jobs are handed on as any unhealthy worker's), gets hosts again
from the coordinator (the remaining ones, or new ones), starts `llama-server` again on them, and
probes its backend at once. A cut link, or a host that died while the group was idle, is seen
through the host's lease: the coordinator stops renewing it once the host's heartbeat lapses.

Which hosts: `--split N` takes the N that lend most; `--split auto` the fewest whose memory, with what
the leader's GPUs lend (`GPUTORRENT_SPLIT_MEMORY_BYTES`, default their free memory; llama.cpp puts no
layer on a CPU-only leader), covers the model's weights plus its KV cache at `GPUTORRENT_N_CTX` (from
the GGUF's metadata). `--split 0` runs `llama-server` alone (the reference a group's output is
compared with). The layers follow the memory each host lends (`--tensor-split`), unless
`GPUTORRENT_TENSOR_SPLIT` gives the proportions.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gputorrent import llama_tools
from gputorrent.config import PACKAGED_MODEL, WorkerSettings
from gputorrent.embedded import free_port
from gputorrent.errors import BackendUnavailable, ModelUnavailable
from gputorrent.protocol import Embeddings, GenerationDone, Group, GroupHost, Job, Shard, ShardAssign, TokenChunk
from gputorrent.worker.backends.llamacpp import resolve_model
from gputorrent.worker.backends.openai import OpenAIBackend
from gputorrent.worker.hardware import gpu_free_memory

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # loading a large model over the network takes a while
RENEW_S = 2.0  # how often the leader renews its hosts' leases (and learns whether they still live)
RETRY_FORM_S = 5.0  # how often a group that cannot re-form asks again
KV_BYTES = 2  # llama.cpp's KV cache is f16 by default
OVERHEAD = 1.1  # compute buffers and the rest, beyond weights and KV cache


@dataclass(frozen=True)
class Need:
    """What a model needs, from its GGUF: weights, KV cache at the context size, and its layer count."""

    weights_bytes: int
    kv_bytes: int
    layers: int

    @property
    def total_bytes(self) -> int:
        return int((self.weights_bytes + self.kv_bytes) * OVERHEAD)


def estimate(path: Path, n_ctx: int) -> Need:
    """Read the GGUF's metadata (llama.cpp's own reader: a vocabulary-only load) for what the model needs."""
    from llama_cpp import Llama

    meta = Llama(model_path=str(path), vocab_only=True, verbose=False).metadata
    arch = meta.get("general.architecture", "llama")

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise ModelUnavailable(f"{path.name}: its GGUF metadata lacks {arch}.{key}")
            return default
        return int(value)

    layers, width, heads = number("block_count"), number("embedding_length"), number("attention.head_count")
    kv_heads = number("attention.head_count_kv", heads)
    key_length = number("attention.key_length", width // heads)
    value_length = number("attention.value_length", key_length)
    kv = n_ctx * layers * kv_heads * (key_length + value_length) * KV_BYTES
    return Need(weights_bytes=path.stat().st_size, kv_bytes=kv, layers=layers)


def layers_per_device(proportions: list[float], layers: int) -> list[int]:
    """How llama.cpp places `layers` repeating layers plus the output layer over devices in these
    proportions (`--tensor-split`): layer i goes to the first device whose cumulative share exceeds
    i / (layers + 1).

    >>> layers_per_device([1, 1], 30)
    [16, 15]
    >>> layers_per_device([3, 1], 30)
    [24, 7]
    """
    total = sum(proportions)
    cumulative, running = [], 0.0
    for share in proportions:
        running += share
        cumulative.append(running / total)
    counts = [0] * len(proportions)
    for layer in range(layers + 1):
        device = min(bisect.bisect_right(cumulative, layer / (layers + 1)), len(proportions) - 1)
        counts[device] += 1
    return counts


class SplitBackend:
    """`llama-server` over this machine and shard hosts; see the module's docstring."""

    name = "llamacpp"
    replays_exactly = False  # llama-server's prompt cache and batching are not ours to control

    def __init__(self, settings: WorkerSettings, group: str) -> None:
        assert settings.split is not None
        self._settings = settings
        self.group = group  # the leader's worker id: the coordinator knows its hosts by it
        self._count = None if settings.split == "auto" else int(settings.split)
        self._base = settings.coordinator_url.rstrip("/")
        self._headers = {"content-type": "application/json"}
        if settings.join_token is not None:
            self._headers["authorization"] = f"Bearer {settings.join_token.get_secret_value()}"
        self._port = free_port()
        self._server: asyncio.subprocess.Process | None = None  # only `_start_server` and `_kill` change it
        self._output: list[str] = []  # llama-server's last lines, for an error
        self._hosts: list[Shard] = []
        self._gpus: list[int] = []  # the leader's own GPUs' share (bytes each): its part of the layers
        self._http = OpenAIBackend(base_url=f"http://127.0.0.1:{self._port}/v1")
        self._model = ""
        self._path: Path | None = None
        self._chat_format: str | None = None
        self._need: Need | None = None
        self._closing = False
        self._forming = False  # the supervisor is (re-)forming: the lease loop leaves the hosts alone
        self._lost: list[str] = []  # hosts whose lease lapsed: the supervisor re-forms without them
        self._lost_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.view: Group | None = None  # where each part of the model is, for the registration
        self.on_broken: Callable[[str], Awaitable[None]] | None = None  # the worker turns unhealthy
        self.on_formed: Callable[[Group], Awaitable[None]] | None = None  # the worker shows the new group

    async def load(self, model: str | None) -> str:
        name = model or PACKAGED_MODEL
        found = resolve_model(name, self._settings.models_dir)
        if found is None:
            raise ModelUnavailable(f"model {name!r} is neither a GGUF file, a packaged model nor a file in "
                                   f"{self._settings.models_dir}; a split model must be on its leader")  # fmt: skip
        self._path, self._chat_format = found
        self._need = await asyncio.to_thread(estimate, self._path, self._settings.n_ctx)
        self._model = name
        await self._form(exclude=[])
        await self._http.load(name)
        self._tasks += [asyncio.create_task(self._keep_hosts()), asyncio.create_task(self._supervise())]
        return name

    def generate(self, job: Job) -> AsyncGenerator[TokenChunk | GenerationDone]:
        return self._http.generate(job)

    async def embed(self, job: Job) -> Embeddings:
        return await self._http.embed(job)

    async def list_models(self) -> list[str]:
        return [self._model] if self._model else []

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):  # whatever a task died of, llama-server is stopped below
                await task
        await self._kill()
        await self._http.close()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, _Refused):
            await self._call("POST", "/shards/release", {"group": self.group, "shard_ids": []})

    # -- forming the group --------------------------------------------------------------------------

    async def _form(self, exclude: list[str]) -> None:
        """Get hosts from the coordinator and start llama-server on them and this machine's GPUs.

        llama.cpp puts a leader's layers only on GPUs (a CPU-only leader keeps the embeddings): the
        shard hosts must hold what the leader's GPUs do not (`GPUTORRENT_SPLIT_MEMORY_BYTES`, default
        their free memory; none without GPUs)."""
        assert self._need is not None
        gpus = [free for _, free in gpu_free_memory()]
        if self._settings.split_memory_bytes is not None and gpus:
            gpus = [self._settings.split_memory_bytes // len(gpus)] * len(gpus)
        self._gpus = gpus
        self._hosts = []
        if self._count != 0:
            from_shards = max(0, self._need.total_bytes - sum(gpus))
            if self._count is None and from_shards == 0:
                log.info("group %s: %s fits on this machine's GPUs; no shard host needed", self.group, self._model)
            else:
                ask = ShardAssign(group=self.group, memory_bytes=from_shards, count=self._count, exclude=exclude,
                                  llama_cpp=llama_tools.llama_cpp_version())  # fmt: skip
                self._hosts = await self._assign(ask)
        await self._start_server()

    async def _assign(self, ask: ShardAssign) -> list[Shard]:
        try:
            answer = await self._call("POST", "/shards/assign", ask.model_dump())
        except _Refused as e:
            assert self._need is not None
            raise ModelUnavailable(
                f"cannot split {self._model} ({self._need.total_bytes / 2**30:.2f} GiB with its KV cache at "
                f"{self._settings.n_ctx} tokens): {e}"
            ) from None
        return [Shard.model_validate(shard) for shard in answer["shards"]]

    async def _start_server(self) -> None:
        assert self._path is not None and self._need is not None
        program = llama_tools.tool(llama_tools.LLAMA_SERVER)
        layers = self._settings.n_gpu_layers if self._settings.n_gpu_layers >= 0 else 999
        argv = [
            str(program), "--model", str(self._path), "--alias", self._model, "--host", "127.0.0.1",
            "--port", str(self._port), "--ctx-size", str(self._settings.n_ctx), "--n-gpu-layers", str(layers),
            # Every job may use the whole context, as in the in-process backend (not n_ctx / slots).
            "--parallel", str(self._settings.slots), "--kv-unified", "--no-webui",
            # Weights a CPU holds locally are repacked for its vector units, and those kernels round
            # differently from the plain ones a shard host's ggml-rpc-server runs: with repacking off,
            # `--split 0` and every group give the same greedy text (docs/benchmarks.md, B10).
            "--no-repack",
        ]  # fmt: skip
        if self._chat_format == "gemma":  # Gemma 3 270M's GGUF has no template (the in-process backend's choice)
            argv += ["--chat-template", "gemma"]
        proportions = self._proportions()
        if self._hosts:
            argv += ["--rpc", ",".join(f"{s.address}:{s.port}" for s in self._hosts)]
            argv += ["--tensor-split", ",".join(f"{p:g}" for p in proportions)]
        started = time.monotonic()
        self._output = []
        server = self._server = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=llama_tools.die_with_parent,
        )
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(_keep_output(server, self._output)))
        await self._until_healthy(server)
        self.view = self._group_view(proportions)
        log.info("group %s serves %s over %s in %.1f s", self.group, self._model,
                 ", ".join(f"{h.address}:{h.port} ({h.layers} layers)" for h in self.view.hosts[1:])
                 or "this machine alone", time.monotonic() - started)  # fmt: skip

    def _proportions(self) -> list[float]:
        """The layers' shares: the shard hosts' (by what each lends, or `GPUTORRENT_TENSOR_SPLIT`), then
        the leader's GPUs' (llama.cpp lists RPC devices first)."""
        if self._settings.tensor_split and self._hosts:
            given = [float(x) for x in self._settings.tensor_split.split(",")]
            if len(given) != len(self._hosts) + len(self._gpus) or not any(given):
                raise ModelUnavailable(
                    f"GPUTORRENT_TENSOR_SPLIT gives {len(given)} proportions for {len(self._hosts)} shard hosts and "
                    f"{len(self._gpus)} GPUs of the leader (not all 0)"
                )
            return given
        return [float(max(s.memory_bytes, 1)) for s in self._hosts] + [float(max(g, 1)) for g in self._gpus]

    def _group_view(self, proportions: list[float]) -> Group:
        assert self._need is not None
        counts = layers_per_device(proportions, self._need.layers) if proportions else []
        hosts = [
            GroupHost(shard_id=s.shard_id, address=s.address, port=s.port, layers=n, memory_bytes=s.memory_bytes)
            for s, n in zip(self._hosts, counts, strict=False)
        ]
        on_leader = self._need.layers + 1 - sum(h.layers for h in hosts)
        leader = GroupHost(shard_id=None, address="leader", port=None, layers=on_leader, memory_bytes=sum(self._gpus))
        return Group(hosts=[leader, *hosts])

    async def _until_healthy(self, server: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self._port}/health"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if server.returncode is not None:
                    raise BackendUnavailable(
                        f"llama-server exited at start ({server.returncode}): {' / '.join(self._output[-4:])}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise BackendUnavailable(f"llama-server did not load {self._model} within {START_TIMEOUT_S:g} s")

    async def _kill(self) -> None:
        server = self._server
        if server is not None and server.returncode is None:
            server.kill()  # a hung llama-server (a cut link) does not stop on SIGTERM
            await server.wait()

    # -- keeping it whole ---------------------------------------------------------------------------

    async def _keep_hosts(self) -> None:
        """Renew the hosts' leases; a host the group no longer holds (its heartbeat lapsed: dead, or its
        link cut) breaks the group, which `_supervise` re-forms. (No probe of ggml-rpc-server itself:
        it accepts one client at a time, and probes would queue behind llama-server's connection.)"""
        while True:
            await asyncio.sleep(RENEW_S)
            hosts = self._hosts
            if not hosts or self._forming:
                continue
            ids = [s.shard_id for s in hosts]
            try:
                answer = await self._call("POST", "/shards/renew", {"group": self.group, "shard_ids": ids})
            except (aiohttp.ClientError, TimeoutError, _Refused, ValueError) as e:
                log.warning("group %s cannot renew its shard hosts (%s)", self.group, e)
                continue
            if self._forming or self._hosts is not hosts:  # re-formed meanwhile: this answer is about old hosts
                continue
            if lost := sorted(set(ids) - {str(shard_id) for shard_id in answer.get("shard_ids", [])}):
                log.warning("group %s lost shard hosts %s (dead, or cut off); re-forming", self.group,
                            ", ".join(lost))  # fmt: skip
                self._lost = lost
                self._lost_event.set()

    async def _supervise(self) -> None:
        """Until closed: when llama-server exits or a host is lost, turn unhealthy and re-form."""
        while not self._closing:
            server = self._server
            assert server is not None
            exited = asyncio.create_task(server.wait())
            lost = asyncio.create_task(self._lost_event.wait())
            await asyncio.wait([exited, lost], return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
            lost.cancel()
            if self._closing:
                return
            self._forming = True
            try:
                await self._reform(server)
            finally:
                self._forming = False

    async def _reform(self, server: asyncio.subprocess.Process) -> None:
        broken_at = time.monotonic()
        reason = (
            f"shard hosts {', '.join(self._lost)} lost (dead, or cut off)" if self._lost_event.is_set()
            else f"llama-server exited ({server.returncode}): a shard host died or its link was cut"
        )  # fmt: skip
        log.warning("group %s broken: %s; re-forming", self.group, reason)
        await self._kill()
        if self.on_broken is not None:
            await self.on_broken(reason)
        # The host that broke it: one whose lease lapsed, or whose ggml-rpc-server no longer takes a
        # connection now that llama-server's is gone (its heartbeat may not have lapsed yet).
        exclude = self._lost or [s.shard_id for s in self._hosts if not await _answers(s)]
        self._lost = []
        self._lost_event.clear()
        while not self._closing:
            try:
                await self._form(exclude=exclude)
                break
            except Exception as e:  # any failure to re-form is retried: the worker stays unhealthy meanwhile
                log.warning("group %s cannot re-form yet (%s); asking again in %g s", self.group, e, RETRY_FORM_S)
                exclude = []  # a host excluded once may be back
                await self._kill()
                await asyncio.sleep(RETRY_FORM_S)
        log.info("group %s re-formed in %.1f s", self.group, time.monotonic() - broken_at)
        if self.on_formed is not None and self.view is not None:
            await self.on_formed(self.view)

    async def _call(self, method: str, path: str, body: object) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.request(method, self._base + path, json=body, headers=self._headers) as resp,
        ):
            if 400 <= resp.status < 500 or resp.status == 503:
                raise _Refused(_message(await resp.text()))
            resp.raise_for_status()
            return await resp.json() if resp.status != 204 else {}


async def _answers(shard: Shard) -> bool:
    """Whether the host's ggml-rpc-server takes a connection: asked only while no llama-server of this
    leader holds one (it serves one client at a time)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(shard.address, shard.port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Refused(Exception):
    pass


def _message(body: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(body)["error"]["message"])
    return body


async def _keep_output(server: asyncio.subprocess.Process, output: list[str]) -> None:
    """Drain llama-server's stderr (a full pipe would block it), keeping its last lines."""
    assert server.stderr is not None
    pending = b""
    while chunk := await server.stderr.read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        output.extend(line.decode(errors="replace").rstrip() for line in lines)
        del output[:-200]
