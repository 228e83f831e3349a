"""Model files peer to peer (`gputorrent.swarm`): real libtorrent sessions on loopback addresses of
their own (127.0.0.N), a file of random bytes as the model."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

lt = pytest.importorskip("libtorrent", reason="libtorrent (the `swarm` extra) has no wheel for this machine")

from gputorrent.swarm import (  # noqa: E402
    RECONNECT_AFTER_S,
    Corrupt,
    ModelFile,
    NoSeeder,
    NotEnoughSpace,
    Progress,
    Swarm,
    describe,
    file_sha256,
)  # fmt: skip

SIZE = 9 * 1024 * 1024 + 12345  # not a whole number of pieces
PIECE = 1024 * 1024
MIB = 1024 * 1024


@pytest.fixture
def model(tmp_path: Path) -> tuple[ModelFile, Path]:
    path = tmp_path / "holder" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(SIZE))
    return describe(path, piece_bytes=PIECE), path


@pytest.fixture
def swarms() -> Iterator[list[Swarm]]:
    made: list[Swarm] = []
    yield made
    for swarm in made:
        swarm.close()


def _swarm(made: list[Swarm], address: str, **kwargs: int) -> Swarm:
    swarm = Swarm(address, **kwargs)
    made.append(swarm)
    return swarm


def test_a_model_is_described_by_its_size_sha256_and_a_private_v2_torrent(model: tuple[ModelFile, Path]) -> None:
    described, path = model
    info = lt.torrent_info(described.torrent)
    assert (described.size, described.sha256) == (SIZE, file_sha256(path))
    assert info.info_hashes().has_v2() and not info.info_hashes().has_v1()
    assert info.priv() and info.piece_length() == PIECE and len(described.info_hash) == 64


def test_a_worker_fetches_a_model_from_two_holders_whole_and_checked(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path
) -> None:
    described, path = model
    holders = [_swarm(swarms, f"127.0.0.{n}") for n in (2, 3)]
    for holder in holders:
        holder.seed(described, path)
    fetcher = _swarm(swarms, "127.0.0.4")
    lines: list[Progress] = []
    fetched = fetcher.fetch(
        described, tmp_path / "fetcher", [(f"127.0.0.{n}", h.port) for n, h in zip((2, 3), holders, strict=True)],
        progress=lines.append,
    )  # fmt: skip
    assert fetched == tmp_path / "fetcher" / "model.gguf"
    assert file_sha256(fetched) == described.sha256
    assert lines and lines[-1].done_bytes == SIZE and lines[-1].eta_s == 0.0
    assert "of 9.0 MiB" in lines[-1].line("model.gguf")


def test_a_peer_that_sends_corrupt_blocks_is_banned_and_the_copy_is_still_right(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path
) -> None:
    """The corrupt peer is libtorrent itself, seeding a copy whose bytes were flipped after its check
    (`Swarm.seed` would refuse such a file); the honest one is slow, so the corrupt one serves blocks."""
    described, path = model
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    corrupt_copy = corrupt_dir / "model.gguf"
    corrupt_copy.write_bytes(path.read_bytes())
    corrupt = lt.session({"enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
                          "listen_interfaces": "127.0.0.5:0", "outgoing_interfaces": "127.0.0.5"})  # fmt: skip
    params = lt.load_torrent_buffer(described.torrent)
    params.save_path = str(corrupt_dir)
    params.flags &= ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
    handle = corrupt.add_torrent(params)
    deadline = time.monotonic() + 30
    while not handle.status().is_seeding:  # its check of the good bytes
        assert time.monotonic() < deadline, "the corrupt peer never finished its check"
        corrupt.wait_for_alert(100)
    with corrupt_copy.open("r+b") as f:
        for offset in range(0, SIZE, PIECE):
            f.seek(offset + 5000)
            f.write(b"\xff" * 64)
    honest = _swarm(swarms, "127.0.0.6", upload_limit_bps=2 * MIB)
    honest.seed(described, path)
    fetcher = _swarm(swarms, "127.0.0.7")
    fetched = fetcher.fetch(
        described, tmp_path / "fetcher", [("127.0.0.5", corrupt.listen_port()), ("127.0.0.6", honest.port)]
    )
    corrupt.remove_torrent(handle)
    assert file_sha256(fetched) == described.sha256
    assert any(peer.startswith("127.0.0.5:") for peer in fetcher.banned), fetcher.banned


def test_a_file_whose_sha256_is_not_the_published_one_is_refused_and_deleted(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path
) -> None:
    described, path = model
    holder = _swarm(swarms, "127.0.0.8")
    holder.seed(described, path)
    misdescribed = dataclasses.replace(described, sha256="0" * 64)
    fetcher = _swarm(swarms, "127.0.0.9")
    with pytest.raises(Corrupt, match="SHA-256"):
        fetcher.fetch(misdescribed, tmp_path / "fetcher", [("127.0.0.8", holder.port)])
    assert not (tmp_path / "fetcher" / "model.gguf").exists()


def test_a_host_the_holder_does_not_allow_gets_nothing(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path
) -> None:
    described, path = model
    holder = _swarm(swarms, "127.0.0.10")
    holder.allow(["127.0.0.12"])  # the pool's registered workers: not 127.0.0.11
    holder.seed(described, path)
    stranger = _swarm(swarms, "127.0.0.11")
    with pytest.raises(NoSeeder, match="nothing arrived"):
        stranger.fetch(described, tmp_path / "stranger", [("127.0.0.10", holder.port)], stall_timeout_s=3)
    partial = tmp_path / "stranger" / "model.gguf"
    assert not partial.exists() or file_sha256(partial) != described.sha256
    member = _swarm(swarms, "127.0.0.12")
    assert file_sha256(member.fetch(described, tmp_path / "member", [("127.0.0.10", holder.port)])) == described.sha256


def test_an_interrupted_fetch_resumes_with_what_it_had(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path
) -> None:
    described, path = model
    holder = _swarm(swarms, "127.0.0.13", upload_limit_bps=3 * MIB)
    holder.seed(described, path)

    def stop_after_2_mib(line: Progress) -> None:
        if line.done_bytes >= 2 * MIB:
            raise KeyboardInterrupt  # as a worker stopped mid-fetch

    first = Swarm("127.0.0.14")
    with pytest.raises(KeyboardInterrupt):
        first.fetch(described, tmp_path / "fetcher", [("127.0.0.13", holder.port)], progress=stop_after_2_mib)
    first.close()
    again = _swarm(swarms, "127.0.0.14")
    lines: list[Progress] = []
    fetched = again.fetch(described, tmp_path / "fetcher", [("127.0.0.13", holder.port)], progress=lines.append)
    assert file_sha256(fetched) == described.sha256
    assert lines[0].done_bytes >= 2 * MIB, "the second fetch began from nothing"


def test_too_little_disk_space_is_a_clear_error_before_the_fetch(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path
) -> None:
    described, _ = model
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        fetcher = _swarm(swarms, "127.0.0.15")
        with pytest.raises(NotEnoughSpace, match=r"needs 0\.01 GiB .* 0\.00 GiB free"):
            fetcher.fetch(described, small, [("127.0.0.1", 1)])
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_fetch_whose_connected_peers_send_nothing_connects_again_and_goes_on(
    model: tuple[ModelFile, Path], swarms: list[Swarm], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A holder that stays connected and sends next to nothing (an upload limit of 200 bytes a second:
    less than a block in `RECONNECT_AFTER_S`) makes the fetch drop its connections and dial every
    peer named again; the fetch goes on, here from a second holder named from the start but up only
    after that."""
    described, path = model
    silent = _swarm(swarms, "127.0.0.16", upload_limit_bps=200)
    silent.seed(described, path)
    with socket.socket() as probe:  # a free port for the holder that comes later
        probe.bind(("127.0.0.18", 0))
        later_port = probe.getsockname()[1]
    fetcher = _swarm(swarms, "127.0.0.17")
    peers = [("127.0.0.16", silent.port), ("127.0.0.18", later_port)]
    fetched: list[Path] = []
    fetching = threading.Thread(target=lambda: fetched.append(
        fetcher.fetch(described, tmp_path / "fetcher", peers, stall_timeout_s=90)
    ))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gputorrent.swarm"):
        fetching.start()
        deadline = time.monotonic() + RECONNECT_AFTER_S + 30
        while not any("connecting again" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and fetching.is_alive(), "the stalled fetch never connected again"
            fetching.join(0.2)
        said = next(r.getMessage() for r in caplog.records if "connecting again" in r.getMessage())
        _swarm(swarms, "127.0.0.18", port=later_port).seed(described, path)
        fetching.join(60)
    assert "127.0.0.16:" in said, said
    assert fetched and file_sha256(fetched[0]) == described.sha256
