"""Model files between workers, peer to peer: a private BitTorrent v2 swarm on libtorrent.

A model file is described once by the worker that has it (`describe`): its size, the SHA-256 of
the whole file, and a v2-only torrent (SHA-256 merkle trees over 16 KiB blocks). A worker that
lacks it fetches it from every peer that holds it (`Swarm.fetch`), and then seeds it too.

Private to the pool: no DHT, no local discovery, no UPnP or NAT-PMP, no tracker, and the torrent is
marked private (never in peer exchange). Peers are given by the caller (from the pool's registry),
and a session can refuse every address but the pool's (`Swarm.allow`, libtorrent's IP filter, both
directions). libtorrent puts loopback and private addresses in a class of their own that no rate
limit applies to; here every address is in the global class, so the upload limit holds on a LAN.

What is checked: every 16 KiB block against the torrent's merkle tree (libtorrent bans exactly the
peer that sent a bad block, and the piece is fetched again from another), then the whole file
against the SHA-256 it was published with (the merkle root is not a SHA-256 of the file, and a
write that failed for want of space can leave libtorrent reporting a complete file that is not).
A file that fails is deleted, never returned.

Piece size: 4 MiB (`PIECE_SIZE`), doubled for files above 32 GiB so no torrent has more than
`MAX_PIECES` pieces (32 bytes each: at most 256 KiB, which a registration carries). v2 pinpoints
corruption to a 16 KiB block whatever the piece size, so large pieces cost little on a failure.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import libtorrent as lt

log = logging.getLogger(__name__)

PIECE_SIZE = 4 * 1024 * 1024
MAX_PIECES = 8192
READ_CHUNK = 1024 * 1024
ALERTS = (
    lt.alert_category.error | lt.alert_category.peer | lt.alert_category.status
    | lt.alert_category.storage | lt.alert_category.ip_block
)  # fmt: skip
PROGRESS_INTERVAL_S = 1.0
FLUSH_TIMEOUT_S = 60.0
STALL_TIMEOUT_S = 60.0  # no byte and no peer for this long: the fetch stops (`NoSeeder`)
# Under a block for this long while a peer with pieces we lack is connected: every connection is
# dropped and the named peers dialled again. Seen here: a holder that stays connected, with the
# fetcher's requests queued at it, and sends nothing after the fetcher banned a corrupt peer (about
# one fetch in 30 of that test, which then failed at the stall timeout); a new connection starts it again.
RECONNECT_AFTER_S = 15.0
BLOCK_BYTES = 16 * 1024  # what a peer sends for one request
_CHECKING = (lt.torrent_status.states.checking_files, lt.torrent_status.states.checking_resume_data)
_ALL_IPV4, _ALL_IPV6 = ("0.0.0.0", "255.255.255.255"), ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


class SwarmError(Exception):
    """A fetch that cannot give the model file; the message says why."""


class NotEnoughSpace(SwarmError):
    """The directory's file system has less free space than the file needs (checked before fetching)."""


class Corrupt(SwarmError):
    """The fetched file's SHA-256 is not the one published: it was deleted."""


class NoSeeder(SwarmError):
    """No peer sent anything for `stall_timeout_s` (none reachable, all banned, or the last left)."""


@dataclass(frozen=True)
class ModelFile:
    """A model file as the pool knows it: enough to fetch it from peers and check it."""

    name: str  # the file's name, also its name in the torrent
    size: int
    sha256: str  # of the whole file, hex
    torrent: bytes  # the whole bencoded v2 torrent (its piece layers sit outside the info dict)

    @property
    def info_hash(self) -> str:
        """The torrent's v2 info-hash, hex: what peers know the file by."""
        return str(lt.torrent_info(self.torrent).info_hashes().v2)


@dataclass(frozen=True)
class Progress:
    """One line of a fetch's progress."""

    done_bytes: int
    total_bytes: int
    rate_bps: float  # download rate, bytes a second
    peers: int  # connected now; on a fetch's last line, the most it had
    eta_s: float | None  # None while nothing arrives

    def line(self, name: str) -> str:
        eta = f"{self.eta_s:.0f} s" if self.eta_s is not None else "?"
        return (
            f"{name}: {self.done_bytes / 2**20:.1f} of {self.total_bytes / 2**20:.1f} MiB, "
            f"{self.rate_bps / 2**20:.1f} MiB/s from {self.peers} peers, {eta} left"
        )


def piece_size(size: int) -> int:
    """`PIECE_SIZE`, doubled until the file has at most `MAX_PIECES` pieces.

    >>> piece_size(250 * 2**20) // 2**20, piece_size(40 * 2**30) // 2**20, piece_size(400 * 2**30) // 2**20
    (4, 8, 64)
    """
    chosen = PIECE_SIZE
    while size > chosen * MAX_PIECES:
        chosen *= 2
    return chosen


def describe(path: Path, piece_bytes: int | None = None) -> ModelFile:
    """Hash `path` (its merkle tree for the torrent, and its SHA-256) and describe it; pieces of
    `piece_bytes` (default: `piece_size`)."""
    size = path.stat().st_size
    made = lt.create_torrent(
        [lt.create_file_entry(path.name, size)], piece_bytes or piece_size(size), lt.create_torrent.v2_only
    )
    made.set_priv(True)
    lt.set_piece_hashes(made, str(path.parent))
    # `generate_buf()` fails in the 2.1.1 wheel (it decodes the bytes as text); bencode the dict instead.
    torrent = lt.bencode(made.generate())
    return ModelFile(name=path.name, size=size, sha256=file_sha256(path), torrent=torrent)


def _peer_states(handle: lt.torrent_handle) -> str:
    """Each connected peer and why it may be sending nothing, for the message of a stalled fetch."""
    states = []
    for peer in handle.get_peer_info():
        why = [name for flag, name in _PEER_FLAGS if peer.flags & flag]
        states.append(f"{_endpoint(peer.ip)} {' '.join(why) or 'unchoked'}, {peer.download_queue_length} requested")
    return "; ".join(states) or "no peer"


_PEER_FLAGS = (
    (lt.peer_info.remote_choked, "chokes us"), (lt.peer_info.snubbed, "snubbed"),
    (lt.peer_info.on_parole, "on parole"), (lt.peer_info.connecting, "connecting"),
)  # fmt: skip


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Swarm:
    """One libtorrent session: the files this worker seeds and fetches, on `address:port` (0: any port).

    `upload_limit_bps` (0: none) and `max_connections` bound what seeding takes from a machine that
    serves inference first. Blocking calls: run them in a thread from an event loop.
    """

    def __init__(
        self, address: str, *, port: int = 0, upload_limit_bps: int = 0, max_connections: int = 50,
    ) -> None:  # fmt: skip
        listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self._session = lt.session({
            "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
            "listen_interfaces": listen, "outgoing_interfaces": address, "alert_mask": ALERTS,
            "upload_rate_limit": upload_limit_bps, "connections_limit": max_connections,
            # Several workers may share a host (and tests share loopback): one peer per address is not enough.
            "allow_multiple_connections_per_ip": True,
            # libtorrent's limiter hands out its quota once a tick, to what each peer's send buffer holds:
            # with the defaults (500 ms, 500 KiB) a 16 MiB/s cap gave 4 MiB/s here; these give 9.
            "send_buffer_watermark": 8 * 1024 * 1024, "tick_interval": 100,
            # libtorrent waits 60 s by default for a request a peer never answered, and as long before
            # dialling a peer that dropped again: a fetch's whole stall timeout, so one lost request could
            # end a fetch still in progress. On a pool's links 10 s is ample.
            "request_timeout": 10, "min_reconnect_time": 10,
        })  # fmt: skip
        every_address = lt.ip_filter()
        every_address.add_rule(*_ALL_IPV4, 1 << lt.session.global_peer_class_id)
        every_address.add_rule(*_ALL_IPV6, 1 << lt.session.global_peer_class_id)
        self._session.set_peer_class_filter(every_address)
        self._handles: dict[str, lt.torrent_handle] = {}
        self._peers: dict[str, set[tuple[str, int]]] = {}  # the peers named for each file being fetched
        self.banned: set[str] = set()  # peers banned for corrupt blocks, "ip:port"

    @property
    def port(self) -> int:
        return int(self._session.listen_port())

    def allow(self, addresses: Iterable[str]) -> None:
        """Accept connections from, and connect to, these addresses only (the pool's registered workers);
        replaces the previous list."""
        only = lt.ip_filter()
        only.add_rule(*_ALL_IPV4, 1)  # 1: blocked
        only.add_rule(*_ALL_IPV6, 1)
        for address in addresses:
            only.add_rule(address, address, 0)
        self._session.set_ip_filter(only)

    def seed(self, model: ModelFile, path: Path, *, verify: bool = True) -> None:
        """Serve `path`, a complete copy of `model` (its SHA-256 checked first, unless the caller just did)."""
        if path.stat().st_size != model.size or (verify and file_sha256(path) != model.sha256):
            raise Corrupt(f"{path} is not {model.name} as published (its size or SHA-256 differs)")
        # seed_mode skips the check the hashes above just made; a piece is verified when first asked for.
        self._add(model, path.parent, lt.torrent_flags.seed_mode)

    def fetch(
        self,
        model: ModelFile,
        directory: Path,
        peers: Iterable[tuple[str, int]],
        *,
        progress: Callable[[Progress], None] | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> Path:
        """Fetch `model` into `directory` from `peers` (address, port), check it and return its path;
        it is then seeded. A partial file left there by an interrupted fetch is checked and kept.

        Raises:
            NotEnoughSpace: before anything is fetched, or when the disk filled up meanwhile.
            NoSeeder: nothing arrived for `stall_timeout_s` (the partial file stays, for a later fetch).
            Corrupt: the whole file's SHA-256 is not the published one (the file is deleted), or the torrent is
                not one file of `model.name` and `model.size`.
        """
        _check_layout(model)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / model.name
        have = path.stat().st_size if path.exists() else 0
        free = shutil.disk_usage(directory).free
        if free + have < model.size:
            raise NotEnoughSpace(
                f"{model.name} needs {model.size / 2**30:.2f} GiB in {directory}, which has {free / 2**30:.2f} GiB free"
            )
        handle = self._add(model, directory)
        self._peers.setdefault(model.info_hash, set())  # named peers are kept while a fetch is under way
        self.connect(model, peers)
        try:
            fetched = self._fetch(model, handle, path, progress, stall_timeout_s)
        except NoSeeder:
            raise  # the handle stays: a holder that comes back connects to it, and the fetch goes on
        except BaseException:
            self._remove(model)  # stopped or failed: nothing more is downloaded
            raise
        self._peers.pop(model.info_hash, None)
        return fetched

    def _fetch(
        self, model: ModelFile, handle: lt.torrent_handle, path: Path, progress: Callable[[Progress], None] | None,
        stall_timeout_s: float,
    ) -> Path:  # fmt: skip
        last_byte_at = last_line_at = last_payload_at = time.monotonic()
        done, payload = -1, -BLOCK_BYTES
        most_peers = 0
        while True:
            for failure in self._drain(handle):
                raise failure
            status = handle.status()
            most_peers = max(most_peers, int(status.num_peers))
            now = time.monotonic()
            if status.total_wanted_done > done or status.state in _CHECKING:  # a check of a partial file is progress
                done, last_byte_at = status.total_wanted_done, now
            if status.is_seeding and status.total_wanted_done == model.size:
                break
            # Payload, not pieces had: a piece that failed its hash is fetched again, which is progress; less
            # than a block (16 KiB) is not.
            if status.total_payload_download >= payload + BLOCK_BYTES:
                payload, last_payload_at = status.total_payload_download, now
            elif now - last_payload_at > RECONNECT_AFTER_S and self._reconnect_if_asked_in_vain(model, handle):
                last_payload_at = now
            if now - last_byte_at > stall_timeout_s:
                raise NoSeeder(
                    f"{model.name}: nothing arrived for {stall_timeout_s:g} s ({status.num_peers} peers connected, "
                    f"{len(self.banned)} banned for corrupt blocks, {status.total_wanted_done} of {model.size} bytes; "
                    f"{_peer_states(handle)}); it resumes on the next fetch"
                )
            if progress is not None and now - last_line_at >= PROGRESS_INTERVAL_S:
                last_line_at = now
                progress(_progress(status, model.size))
            self._session.wait_for_alert(200)
        if progress is not None:  # with the most peers it had: once complete, libtorrent drops the other seeds at once
            progress(replace(_progress(handle.status(), model.size), peers=most_peers))
        self._flush(handle)
        if file_sha256(path) != model.sha256:
            path.unlink(missing_ok=True)
            raise Corrupt(f"{model.name}: the fetched file's SHA-256 is not the published one; it was deleted")
        return path

    def connect(self, model: ModelFile, peers: Iterable[tuple[str, int]]) -> None:
        """Connect to these peers (address, port) for `model`, which this session seeds or fetches."""
        handle = self._handles.get(model.info_hash)
        if handle is not None:
            named = self._peers.get(model.info_hash)
            for peer in peers:
                if named is not None:
                    named.add(peer)
                handle.connect_peer(peer)

    def _reconnect_if_asked_in_vain(self, model: ModelFile, handle: lt.torrent_handle) -> bool:
        """When a connected peer has pieces this fetch lacks and nothing came for `RECONNECT_AFTER_S`
        (it chokes us, or holds our requests and sends nothing): drop every connection of `handle`
        (fetchers of this node's pieces too: they dial again) and dial the named peers again
        (libtorrent refuses those it banned). Whether it did."""
        if not any(peer.flags & lt.peer_info.interesting for peer in handle.get_peer_info()):
            return False  # no holder is connected: the stall timeout handles that
        log.warning("%s: under 16 KiB arrived in %g s from the peers connected (%s); connecting again",
                    model.name, RECONNECT_AFTER_S, _peer_states(handle))  # fmt: skip
        handle.pause()
        handle.resume()
        for peer in list(self._peers.get(model.info_hash, ())):  # a copy: `connect` adds from the event loop
            handle.connect_peer(peer)
        return True

    def close(self) -> None:
        self._peers.clear()
        for info_hash in list(self._handles):
            self._session.remove_torrent(self._handles.pop(info_hash))

    def _add(self, model: ModelFile, directory: Path, flags: int = 0) -> lt.torrent_handle:
        if model.info_hash in self._handles:
            return self._handles[model.info_hash]
        params = lt.load_torrent_buffer(model.torrent)
        params.save_path = str(directory)
        # Not queued behind other torrents (libtorrent's queue would pause a sixth seed).
        params.flags = (params.flags | flags) & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
        handle = self._handles[model.info_hash] = self._session.add_torrent(params)
        return handle

    def _flush(self, handle: lt.torrent_handle) -> None:
        """Until every block is on disk: libtorrent calls a piece had once its hash passed, which may be
        before its write (the file may not even exist yet)."""
        handle.flush_cache()
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while time.monotonic() < deadline:
            self._session.wait_for_alert(200)
            if any(isinstance(a, lt.cache_flushed_alert) and a.handle == handle for a in self._alerts()):
                return
        raise SwarmError(f"libtorrent did not write the file within {FLUSH_TIMEOUT_S:g} s")

    def _remove(self, model: ModelFile) -> None:
        self._peers.pop(model.info_hash, None)
        handle = self._handles.pop(model.info_hash, None)
        if handle is not None:
            self._session.remove_torrent(handle)

    def _drain(self, handle: lt.torrent_handle) -> list[SwarmError]:
        """The failures among the session's alerts that end the fetch of `handle`."""
        return [
            # libtorrent goes on in upload mode and may call the file complete: stop here.
            NotEnoughSpace(f"the disk filled up while fetching: {alert.message()}")
            for alert in self._alerts()
            if isinstance(alert, lt.file_error_alert) and alert.handle == handle and alert.error.value() == errno.ENOSPC
        ]

    def _alerts(self) -> list[Any]:
        """The session's alerts since the last read, a banned peer noted. Each is valid only until the next
        read: callers look at them before reading again."""
        alerts = self._session.pop_alerts()
        for alert in alerts:
            if isinstance(alert, lt.peer_ban_alert):
                self.banned.add(_endpoint(alert.endpoint))
        return list(alerts)


def _check_layout(model: ModelFile) -> None:
    """Check that the torrent is one file, `model.name` of `model.size` bytes (v2 adds a pad file after it).

    Raises:
        Corrupt: it is not (or it is no torrent at all): fetching it would write something else.
    """
    try:
        files = lt.torrent_info(model.torrent).layout()
    except RuntimeError as e:
        raise Corrupt(f"{model.name}: the catalogue's torrent cannot be read: {e}") from None
    if files.file_path(0) != model.name or files.file_size(0) != model.size:
        raise Corrupt(
            f"{model.name}: the catalogue's torrent describes {files.file_path(0)!r} of {files.file_size(0)} bytes, "
            f"not {model.name!r} of {model.size}"
        )


def _progress(status: lt.torrent_status, size: int) -> Progress:
    rate = float(status.download_payload_rate)
    left = size - status.total_wanted_done
    return Progress(
        done_bytes=int(status.total_wanted_done),
        total_bytes=size,
        rate_bps=rate,
        peers=int(status.num_peers),
        eta_s=left / rate if rate > 0 else (0.0 if left == 0 else None),
    )


def _endpoint(endpoint: tuple[str, int]) -> str:
    address, port = endpoint
    return f"{address}:{port}"
