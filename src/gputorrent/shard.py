"""`gputorrent shard`: run llama.cpp's `ggml-rpc-server` on one address of this machine, with its tensor
cache on, and lend it to the pool: register it with the memory it lends, beat, and leave when told to
stop. It serves no model itself; a group's leader (`gputorrent worker --split`) puts layers on it.

`ggml-rpc-server` has no authentication and has had remote-code-execution bugs: it listens only on
the address it is given, never every interface by default, and a public address needs
`--allow-public` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time

import aiohttp
import psutil

from gputorrent import llama_tools
from gputorrent.config import ShardSettings
from gputorrent.protocol import ShardRegistration
from gputorrent.retry import Backoff
from gputorrent.worker.hardware import gpu_free_memory

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0  # how long ggml-rpc-server may take to listen
REQUEST_TIMEOUT_S = 10.0


class ShardRefused(ValueError):
    """A `--listen` address the shard host will not use; the message says why and what to do."""


def listen_address(listen: str, *, allow_public: bool) -> tuple[str, int]:
    """`HOST:PORT` (an IPv4 address of this machine) checked against the policy.

    >>> listen_address("10.0.0.5:50052", allow_public=False)
    ('10.0.0.5', 50052)
    >>> listen_address("0.0.0.0:50052", allow_public=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gputorrent.shard.ShardRefused: 0.0.0.0 is every interface of this machine, ...
    >>> listen_address("8.8.8.8:50052", allow_public=True)
    ('8.8.8.8', 50052)
    """
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ShardRefused(f"--listen {listen!r}: give HOST:PORT with HOST an IP address of this machine") from None
    if not sep or not 0 < number < 65536:
        raise ShardRefused(f"--listen {listen!r}: the port must be 1 to 65535")
    if address.version != 4:
        raise ShardRefused(f"--listen {listen!r}: ggml-rpc-server listens on IPv4 addresses only")
    if address.is_unspecified:  # with --allow-public too: leaders need the one address to connect to
        raise ShardRefused(
            f"{address} is every interface of this machine, and ggml-rpc-server has no authentication: give the "
            "address of one interface on a private network (a public one only with --allow-public, see "
            "docs/security.md)"
        )
    if not allow_public and not (address.is_private or address.is_loopback or address.is_link_local):
        raise ShardRefused(
            f"{address} is a public address, and ggml-rpc-server has no authentication: keep shard links on a "
            "private network (or --allow-public, see docs/security.md)"
        )
    return str(address), number


def lendable_memory() -> tuple[int, list[str]]:
    """What this machine can lend now (its GPUs' free memory, else the RAM available), and its devices
    with what each has free."""
    gpus = gpu_free_memory()
    if gpus:
        return sum(free for _, free in gpus), [f"{name}: {free / 2**30:.1f} GiB free" for name, free in gpus]
    ram = psutil.virtual_memory().available
    return ram, [f"CPU ({psutil.cpu_count(logical=True) or '?'} cores): {ram / 2**30:.1f} GiB RAM available"]


async def run_shard(settings: ShardSettings, stop: asyncio.Event) -> None:
    """Run ggml-rpc-server, register it, beat until `stop`, then leave and stop it."""
    host, port = listen_address(settings.listen, allow_public=settings.allow_public)
    program = llama_tools.tool(llama_tools.RPC_SERVER)
    server = await asyncio.create_subprocess_exec(
        str(program), "--host", host, "--port", str(port), "--cache",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, preexec_fn=llama_tools.die_with_parent,
    )  # fmt: skip
    output: list[str] = []
    reading = asyncio.create_task(_read_output(server, output))
    try:
        await _until_listening(server, host, port, output)
        log.info("ggml-rpc-server listens on %s:%d (tensor cache on)", host, port)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http:
            shard = _Coordinator(http, settings)
            memory, devices = _lent(settings)
            registration = ShardRegistration(
                shard_id=settings.shard_id, address=host, port=port, memory_bytes=memory, devices=devices,
                llama_cpp=llama_tools.llama_cpp_version(),
            )  # fmt: skip
            shard_id, interval_s = await shard.register(registration)
            log.info(
                "shard host %s lends %d MiB to the pool at %s", shard_id, memory // 2**20, settings.coordinator_url
            )
            try:
                await _beat_until(stop, server, shard, shard_id, registration, interval_s, settings)
            finally:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await shard.leave(shard_id)
    finally:
        if server.returncode is None:
            server.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait(), 10)
            if server.returncode is None:
                server.kill()
        reading.cancel()


def _lent(settings: ShardSettings) -> tuple[int, list[str]]:
    memory, devices = lendable_memory()
    return (memory if settings.memory_bytes is None else min(memory, settings.memory_bytes)), devices


async def _beat_until(
    stop: asyncio.Event, server: asyncio.subprocess.Process, shard: _Coordinator, shard_id: str,
    registration: ShardRegistration, interval_s: float, settings: ShardSettings,
) -> None:  # fmt: skip
    exited = asyncio.create_task(server.wait())
    try:
        while not stop.is_set():
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([stopping, exited], timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if exited.done():
                raise RuntimeError(f"ggml-rpc-server exited with code {server.returncode}")
            if stop.is_set():
                return
            try:
                # What it lends is fixed at start: its free memory shrinks while a group's layers are on it.
                if not await shard.beat(shard_id, registration.memory_bytes):  # the pool forgot it (Redis restarted)
                    await shard.register(registration.model_copy(update={"shard_id": shard_id}))
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("shard host %s cannot beat (%s); retrying", shard_id, e)
    finally:
        exited.cancel()


async def _read_output(server: asyncio.subprocess.Process, output: list[str]) -> None:
    """Keep ggml-rpc-server's lines (for an error) and log them."""
    assert server.stdout is not None
    async for raw in server.stdout:
        line = raw.decode(errors="replace").rstrip()
        output.append(line)
        del output[:-50]
        if line:
            log.info("ggml-rpc-server: %s", line)


async def _until_listening(server: asyncio.subprocess.Process, host: str, port: int, output: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.returncode is not None:
            raise RuntimeError(f"ggml-rpc-server exited at start ({server.returncode}): {' / '.join(output[-5:])}")
        # Its banner is block-buffered on a pipe: a connection tells. It serves one client at a time, and
        # takes the next once this one closes.
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"ggml-rpc-server did not listen on {host}:{port} within {START_TIMEOUT_S:g} s")


class _Coordinator:
    def __init__(self, http: aiohttp.ClientSession, settings: ShardSettings) -> None:
        self._http = http
        self._base = settings.coordinator_url.rstrip("/")
        self._headers = {"content-type": "application/json"}
        if settings.join_token is not None:
            self._headers["authorization"] = f"Bearer {settings.join_token.get_secret_value()}"

    async def register(self, registration: ShardRegistration) -> tuple[str, float]:
        backoff = Backoff(first_s=0.2, max_s=3.0)
        deadline = time.monotonic() + 60
        while True:
            try:
                async with self._http.post(
                    f"{self._base}/shards", data=registration.model_dump_json(), headers=self._headers
                ) as resp:
                    if resp.status < 500 and resp.status != 200:
                        raise RuntimeError(
                            f"the coordinator refused the shard host ({resp.status}): {await resp.text()}"
                        )
                    resp.raise_for_status()
                    answer = await resp.json()
                    return str(answer["shard_id"]), float(answer["heartbeat_interval_s"])
            except (aiohttp.ClientError, TimeoutError) as e:
                if time.monotonic() + backoff.delay_s > deadline:
                    raise RuntimeError(f"cannot reach the coordinator at {self._base}: {e}") from e
                log.info("coordinator not reachable yet (%s); retrying", e)
                await backoff.wait()

    async def beat(self, shard_id: str, memory_bytes: int) -> bool:
        async with self._http.post(
            f"{self._base}/shards/{shard_id}/beat", json={"memory_bytes": memory_bytes}, headers=self._headers
        ) as resp:
            if resp.status == 404:
                return False
            resp.raise_for_status()
            return True

    async def leave(self, shard_id: str) -> None:
        async with self._http.delete(f"{self._base}/shards/{shard_id}", headers=self._headers) as resp:
            resp.raise_for_status()
