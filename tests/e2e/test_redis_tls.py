"""The pool over TLS to Redis (`rediss://`), against a Redis built with TLS (Debian's `redis-server`;
the packaged Valkey has no TLS)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, healthy, wait_for

SERVER = shutil.which("redis-server")
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    SERVER is None or OPENSSL is None, reason="needs Debian's redis-server (built with TLS) and openssl"
)


@pytest.fixture
def tls_redis_url(tmp_path: Path) -> Iterator[str]:
    """A private TLS-only Redis with a fresh self-signed certificate; yields its rediss:// URL."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [str(OPENSSL), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [str(SERVER), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", "",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}?ssl_ca_certs={cert}"
    try:
        wait_for(lambda: _pings(url) or server.poll() is not None, 10, "the TLS Redis")
        assert server.poll() is None
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _pings(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_pool_runs_over_tls_to_redis(tls_redis_url: str, processes: Callable[..., Process]) -> None:
    plaintext_url = tls_redis_url.replace("rediss://", "redis://").split("?")[0]
    with redis.Redis.from_url(plaintext_url, socket_timeout=2) as plain, pytest.raises(redis.ConnectionError):
        plain.ping()  # the server speaks TLS only: no plaintext path
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"REDIS_URL": tls_redis_url, "GPUTORRENT_AUTH": "off", "GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5"}
    coordinator = processes("coordinator", "--port", str(port), name="coordinator", env=env)
    wait_for(lambda: healthy(url) or coordinator.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "the coordinator")
    worker = processes("worker", "--backend", "fake", "--coordinator", url, "--worker-id", "w1", name="worker",
                       env={"REDIS_URL": tls_redis_url})  # fmt: skip
    with APIClient(url) as client:
        wait_for(lambda: worker.popen.poll() is not None or bool(client.workers()), PROCESS_START_TIMEOUT_S, "w1")
        assert client.infer("fake", "over tls").output == "echo: over tls"
