"""The network-namespace hosts of tests/netns.py: separate stacks, links that cut and come back, nothing left after."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.netns import Host, Network, ip, unavailable_reason

ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 7000))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(conn.recv(64))
    conn.close()
"""


def _echo(host: Host, address: str, timeout_s: float = 1.0) -> bytes | None:
    """Send bytes from `host` to the echo server at `address`; what came back, None when unreachable."""
    with host.entered():
        try:
            with socket.create_connection((address, 7000), timeout=timeout_s) as conn:
                conn.sendall(b"ping")
                return conn.recv(64)
        except OSError:
            return None


def test_hosts_talk_over_their_links_only_and_a_cut_link_carries_nothing_until_restored(
    netns_hosts: Callable[..., dict[str, Host]],
) -> None:
    hosts = netns_hosts("server", "client")
    server, client = hosts["server"], hosts["client"]
    assert server.address != client.address
    echo = server.popen([sys.executable, "-c", ECHO_SERVER, server.address], stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline() == b"listening\n"

    assert _echo(client, server.address) == b"ping"
    # Each host has its own loopback: the server is not on the client's 127.0.0.1.
    assert _echo(client, "127.0.0.1") is None
    server.cut()
    assert server.is_cut
    assert _echo(client, server.address) is None  # the SYN is dropped: a timeout, not a refusal
    server.restore()
    assert _echo(client, server.address, timeout_s=5) == b"ping"


def test_closing_a_network_kills_its_processes_and_removes_every_namespace_veth_and_bridge() -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    network = Network()
    host = network.add("x")
    sleeper = host.popen(["sleep", "600"])
    assert host.namespace in ip("netns", "list").stdout
    network.close()
    assert sleeper.poll() is not None
    assert network.tag not in ip("netns", "list").stdout
    assert network.tag not in ip("link", "show").stdout
    network.close()  # a second close (a teardown after a failed one) is harmless
