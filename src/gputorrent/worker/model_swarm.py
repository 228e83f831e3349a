"""A llama.cpp worker's part in the pool's swarm: it fetches the model files it lacks from the workers
that hold them, and seeds the files it holds (gputorrent/swarm.py does the BitTorrent; the catalogue
and who may connect come from the coordinator, gputorrent/catalogue.py).

The coordinator is asked with the join key, as `/register` is: a worker fetches its model before it
registers. Fetched files go to `GPUTORRENT_MODELS_DIR/by-sha256/{sha256}/{file name}`, so two models
whose files share a name never overwrite each other, and a restarted fetch resumes in place.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from gputorrent.config import WorkerSettings
from gputorrent.errors import ModelUnavailable
from gputorrent.protocol import (
    PullProgress,
    SwarmFetch,
    SwarmFile,
    SwarmMembers,
    SwarmPeer,
    SwarmProgress,
    SwarmSource,
)
from gputorrent.retry import Backoff

if TYPE_CHECKING:
    from gputorrent import swarm
    from gputorrent.swarm import Progress

log = logging.getLogger(__name__)

PAUSED_RETRY_S = 5.0  # how often a paused fetch asks whether a holder is back
FETCHING_FOLLOW_S = 2.0  # how often a fetch sends its progress (and reads the members)
ANNOUNCE_TIMEOUT_S = 60.0  # how long a fetch keeps asking a coordinator it cannot reach
STOP_CHECK_S = 0.5  # how soon a fetch waiting for another one notices it was stopped
PAUSED_LOG_S = 60.0  # how often a paused fetch says so again in the log
COORDINATOR_TIMEOUT_S = 10.0


class FetchStopped(Exception):
    """The fetch was told to stop (its pull job ended, or the worker stops)."""


class ModelSwarm:
    """One libtorrent session (`swarm.Swarm`) for this worker, and its dealings with the coordinator."""

    def __init__(self, settings: WorkerSettings, address: str) -> None:
        from gputorrent import swarm  # the `swarm` extra: imported only where the swarm is on

        self._swarm_module = swarm
        self._swarm = swarm.Swarm(
            address, port=settings.swarm_port, upload_limit_bps=settings.swarm_upload_limit_bps,
            max_connections=settings.swarm_max_connections,
        )  # fmt: skip
        self._swarm.allow([address])  # nobody else until the coordinator names the members
        self.peer = SwarmPeer(address=address, port=self._swarm.port)
        self.models_dir = settings.models_dir
        self._coordinator = settings.coordinator_url.rstrip("/")
        self._headers = {"content-type": "application/json"}
        if settings.join_token is not None:
            self._headers["authorization"] = f"Bearer {settings.join_token.get_secret_value()}"
        self._stall_timeout_s = settings.swarm_stall_timeout_s
        self._seeding: dict[str, SwarmFile] = {}  # model → its file, seeded here
        self._wanted: dict[str, SwarmFile] = {}  # model → its file, being fetched here
        self._progress: dict[str, SwarmProgress] = {}  # model → how its fetch goes (set from the fetching thread)
        self._fetching = asyncio.Lock()  # one fetch at a time: a fetch reads the session's alerts
        self._stops: set[threading.Event] = set()  # those of the fetches under way or waiting: `stop()` sets them

    @classmethod
    def open(cls, settings: WorkerSettings) -> ModelSwarm | None:
        """The worker's swarm; None (and the log says why) when it is off or libtorrent is missing."""
        if not settings.swarm:
            return None
        try:
            import libtorrent  # noqa: F401
        except ImportError:
            log.warning("the swarm is off: libtorrent is not installed (pip install 'gputorrent[swarm]'); this "
                        "worker neither fetches model files from its peers nor seeds its own")  # fmt: skip
            return None
        try:
            reaching: str | None = reaching_address(settings.coordinator_url)
        except OSError as e:
            if settings.swarm_address is None:
                log.error("the swarm is off: no address reaches the coordinator at %s (%s); set "
                          "GPUTORRENT_SWARM_ADDRESS", settings.coordinator_url, e)  # fmt: skip
                return None
            reaching = None
        address = settings.swarm_address or reaching
        assert address is not None
        if ipaddress.ip_address(address).is_loopback and reaching != address:
            # A loopback address is right for a pool on one machine (`gputorrent up`), not beside a remote coordinator.
            log.warning("the swarm listens on %s, which only this machine reaches: workers on other machines cannot "
                        "fetch from this one (set GPUTORRENT_SWARM_ADDRESS to its LAN address)", address)  # fmt: skip
        opened = cls(settings, address)
        log.info("swarm listening on %s:%d (upload limit %s, at most %d connections)", address, opened.peer.port,
                 f"{settings.swarm_upload_limit_bps} B/s" if settings.swarm_upload_limit_bps else "none",
                 settings.swarm_max_connections)  # fmt: skip
        return opened

    @property
    def files(self) -> dict[str, SwarmFile]:
        """The files this worker seeds, by model: what it publishes when it registers."""
        return dict(self._seeding)

    def stored_path(self, file: SwarmFile) -> Path:
        return self.models_dir / "by-sha256" / file.sha256 / file.name

    async def fetch(
        self, model: str, progress: Callable[[PullProgress], None] | None = None, stop: threading.Event | None = None
    ) -> Path:
        """Fetch `model`'s file from its holders (resuming a partial copy), check its SHA-256 and seed it.
        With no holder sending, the fetch pauses (`progress` says so) until one is back.

        Raises:
            ModelUnavailable: not in the catalogue, no room for it on disk, its copy was corrupt, or the
                coordinator could not be asked.
            FetchStopped: `stop` was set, or `stop()` called.
        """
        stop = stop or threading.Event()
        self._stops.add(stop)
        try:
            await self._acquire(stop)
            try:
                return await self._fetch_and_seed(model, progress, stop)
            finally:
                self._fetching.release()
        finally:
            self._stops.discard(stop)

    def stop(self) -> None:
        """Stop every fetch under way or waiting (the worker stops)."""
        for stop in list(self._stops):
            stop.set()

    async def _acquire(self, stop: threading.Event) -> None:
        """The fetching lock, unless `stop` is set while another fetch holds it."""
        while True:
            try:
                await asyncio.wait_for(self._fetching.acquire(), STOP_CHECK_S)
                return
            except TimeoutError:
                if stop.is_set():
                    raise FetchStopped("stopped while another fetch ran") from None

    async def _fetch_and_seed(
        self, model: str, progress: Callable[[PullProgress], None] | None, stop: threading.Event
    ) -> Path:
        source = await self._announce(model, stop)
        file = source.file
        path = self.stored_path(file)
        try:
            if await asyncio.to_thread(self._complete, path, file):
                log.info("%s: the file in %s is complete", model, path.parent)
            else:
                self._wanted[model] = file
                self._progress[model] = SwarmProgress(
                    model=model, peer=self.peer, done_bytes=0, total_bytes=file.size, rate_bps=0, peers=0
                )
                reporting = asyncio.create_task(self._report_while_fetching(model))
                try:
                    path = await self._fetch(model, source, progress, stop)
                finally:
                    reporting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporting  # no progress lands after the end is told below
                    del self._wanted[model], self._progress[model]
                self._remember(path, file)
            await self.seed(model, path, file)
            return path
        finally:  # fetched, failed or stopped: the holders need not connect to it any more
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, _NotInCatalogue):
                await self._request("POST", "/swarm/fetched", SwarmFetch(model=model, peer=self.peer).model_dump_json())

    async def _fetch(
        self, model: str, source: SwarmSource, progress: Callable[[PullProgress], None] | None,
        stop: threading.Event,
    ) -> Path:  # fmt: skip
        swarm = self._swarm_module
        file = source.file
        described = self._model_file(file)

        def report(fetched: Progress) -> None:  # on the fetching thread
            if stop.is_set():
                raise FetchStopped(f"the fetch of {model} was stopped")
            line = fetched.line(model)
            log.info("%s", line)
            self._progress[model] = SwarmProgress(
                model=model, peer=self.peer, done_bytes=fetched.done_bytes, total_bytes=file.size,
                rate_bps=fetched.rate_bps, peers=fetched.peers,
            )  # fmt: skip
            if progress is not None:
                progress(PullProgress(status=line, digest=f"sha256:{file.sha256}", total=file.size,
                                      completed=fetched.done_bytes))  # fmt: skip

        paused_logged_at = 0.0
        while True:
            self._swarm.allow([*source.members, self.peer.address])
            if source.holders:
                peers = [(p.address, p.port) for p in [*source.holders, *source.fetching]]
                log.info("%s: fetching %.1f MiB from %d holders (and %d other fetchers) into %s", model,
                         file.size / 2**20, len(source.holders), len(source.fetching),
                         self.stored_path(file).parent)  # fmt: skip
                try:
                    return await asyncio.to_thread(
                        self._swarm.fetch, described, self.stored_path(file).parent, peers, progress=report,
                        stall_timeout_s=self._stall_timeout_s,
                    )  # fmt: skip
                except swarm.NoSeeder as e:
                    reason = str(e)
                except (swarm.NotEnoughSpace, swarm.Corrupt) as e:
                    raise ModelUnavailable(str(e)) from None
            else:
                reason = f"{model}: no live worker holds it"
            # Paused: the partial file stays, and libtorrent checks it when the fetch goes on.
            status = f"paused: no holder of {model} is sending ({reason}); waiting for one to come back"
            if time.monotonic() - paused_logged_at > PAUSED_LOG_S:
                log.warning("%s", status)
                paused_logged_at = time.monotonic()
            self._progress[model] = self._progress[model].model_copy(update={"rate_bps": 0, "peers": 0, "paused": True})
            if progress is not None:
                progress(PullProgress(status=status, digest=f"sha256:{file.sha256}", total=file.size))
            if await asyncio.to_thread(stop.wait, PAUSED_RETRY_S):
                raise FetchStopped(f"the fetch of {model} was stopped while paused")
            source = await self._announce(model, stop)

    async def seed(self, model: str, path: Path, file: SwarmFile | None = None) -> SwarmFile:
        """Seed `path` as `model`'s file (described here unless `file` is given, from a cache beside the
        models so a restart does not hash the file again) and return it."""
        if file is None:
            file = await asyncio.to_thread(self._describe, path)
        # Not hashed again: its SHA-256 was just computed, checked after a fetch, or cached for this mtime.
        await asyncio.to_thread(self._swarm.seed, self._model_file(file), path, verify=False)
        self._seeding[model] = file
        log.info("seeding %s (%s, %.1f MiB) on %s:%d", model, file.name, file.size / 2**20, self.peer.address,
                 self.peer.port)  # fmt: skip
        return file

    def _describe(self, path: Path) -> SwarmFile:
        """`swarm.describe`, kept in `MODELS_DIR/.swarm/` by the file's path, size and modification time."""
        if (cached := self._cached(path)) is not None:
            return cached
        log.info("hashing %s for the swarm (once per file)", path)
        described = self._swarm_module.describe(path)
        file = SwarmFile(name=described.name, size=described.size, sha256=described.sha256,
                         torrent=base64.b64encode(described.torrent).decode())  # fmt: skip
        self._remember(path, file)
        return file

    def _complete(self, path: Path, file: SwarmFile) -> bool:
        """Whether `path` is `file` whole (by the cache, else by its SHA-256, then cached)."""
        if not path.is_file() or path.stat().st_size != file.size:
            return False
        if (cached := self._cached(path)) is not None:
            return cached.sha256 == file.sha256
        if self._swarm_module.file_sha256(path) != file.sha256:
            return False  # a partial copy (its full size allocated): the fetch goes on from it
        self._remember(path, file)
        return True

    def _cache_entry(self, path: Path) -> tuple[Path, dict[str, object]]:
        stat, resolved = path.stat(), str(path.resolve())
        name = hashlib.sha256(resolved.encode()).hexdigest()[:32]
        return self.models_dir / ".swarm" / f"{name}.json", {
            "path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        }  # fmt: skip

    def _cached(self, path: Path) -> SwarmFile | None:
        cache, key = self._cache_entry(path)
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads(cache.read_text())
            if cached["key"] == key:
                return SwarmFile.model_validate(cached["file"])
        return None

    def _remember(self, path: Path, file: SwarmFile) -> None:
        cache, key = self._cache_entry(path)
        with contextlib.suppress(OSError):  # without the cache the file is hashed again at the next start
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "file": file.model_dump()}))

    async def _report_while_fetching(self, model: str) -> None:
        """Send the fetch's progress (the dashboard shows it) and let in the members the answer names:
        a fetching worker has no heartbeat yet, and fetchers that start after it must get in."""
        while True:
            await asyncio.sleep(FETCHING_FOLLOW_S)
            try:
                answer = await self._request("POST", "/swarm/progress", self._progress[model].model_dump_json())
                self._let_in(SwarmMembers.model_validate_json(answer))
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                log.debug("the fetch's progress could not be sent (%s)", e)

    async def follow(self) -> bool:
        """The pool's swarm changed (a worker joined, or a fetch began): let the members in, and connect
        to the fetchers of the models this worker seeds. False when the members could not be read."""
        try:
            members = SwarmMembers.model_validate_json(await self._request("GET", "/swarm/members"))
        except (aiohttp.ClientError, TimeoutError, ValueError, _NotInCatalogue) as e:
            log.warning("the swarm's members could not be read (%r); retrying at the next beat", e)
            return False
        self._let_in(members)
        return True

    def _let_in(self, members: SwarmMembers) -> None:
        self._swarm.allow([*members.members, self.peer.address])
        for model, fetchers in members.fetching.items():
            if (file := self._seeding.get(model) or self._wanted.get(model)) is not None:
                others = [(p.address, p.port) for p in fetchers if p != self.peer]
                self._swarm.connect(self._model_file(file), others)  # libtorrent skips peers it has

    def _model_file(self, file: SwarmFile) -> swarm.ModelFile:
        return self._swarm_module.ModelFile(
            name=file.name, size=file.size, sha256=file.sha256, torrent=base64.b64decode(file.torrent)
        )

    async def _announce(self, model: str, stop: threading.Event) -> SwarmSource:
        """Ask the coordinator where `model` is, retrying for `ANNOUNCE_TIMEOUT_S` while it cannot be
        reached (it may be starting, or restarting)."""
        body = SwarmFetch(model=model, peer=self.peer).model_dump_json()
        deadline = time.monotonic() + ANNOUNCE_TIMEOUT_S
        backoff = Backoff(first_s=0.2, max_s=3.0)
        while True:
            try:
                return SwarmSource.model_validate_json(await self._request("POST", "/swarm/fetch", body))
            except _NotInCatalogue:
                raise ModelUnavailable(
                    f"model {model!r} is neither here nor in the pool's catalogue (no llama.cpp worker published "
                    "its file)"
                ) from None
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                if time.monotonic() + backoff.delay_s > deadline:
                    raise ModelUnavailable(f"cannot ask the coordinator where {model!r} is: {e!r}") from None
                log.info("cannot ask the coordinator where %s is yet (%r); retrying", model, e)
            if stop.is_set():
                raise FetchStopped(f"the fetch of {model} was stopped")
            await backoff.wait()

    async def _request(self, method: str, path: str, body: str | None = None) -> bytes:
        timeout = aiohttp.ClientTimeout(total=COORDINATOR_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.request(method, self._coordinator + path, data=body, headers=self._headers) as resp,
        ):
            if resp.status == 404:
                raise _NotInCatalogue
            resp.raise_for_status()
            return await resp.read()

    def close(self) -> None:
        self._swarm.close()


class _NotInCatalogue(Exception):
    pass


def reaching_address(url: str) -> str:
    """The address of this machine that reaches `url`'s host (no packet is sent): the one the
    coordinator's other workers can most likely reach too."""
    parts = urlsplit(url)
    family, _, _, _, target = socket.getaddrinfo(parts.hostname or "localhost", parts.port or 80,
                                                 type=socket.SOCK_DGRAM)[0]  # fmt: skip
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(target)
        return str(probe.getsockname()[0])
