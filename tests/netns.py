"""Hosts on real links: Linux network namespaces joined by veth pairs and a bridge.

Each `Host` is a network namespace with loopback up and one interface (`eth0`), the inside end of
a veth pair whose other end is a port of a bridge in the root namespace. Every host has its own
address on a private /24 chosen per network (10.x.y.0/24, one not routed here yet), so processes
reach each other only over those links, as on separate machines; each host has its own port space,
so every host's Redis can listen on 6379 and every coordinator on 8000.

The test process itself stays in the root namespace. The bridge carries an address of the subnet
too (`Network.observer`, .254), so the test can watch Redis and read results as an observer that
no cut reaches; a test that wants a request to come from a host runs it inside `host.entered()`
(its thread joins the host's namespace for the `with` block; sockets made there stay there) or
starts a process there with `host.popen([...])` (`ip netns exec`).

Cutting a host's link is `ip link set <its bridge-side veth> down`: the host keeps its address and
its sockets, and what it sends is dropped without an error, as when a cable or a switch port goes.
Established TCP connections therefore do not fail at once: they hang until a timeout of the
application or of TCP, and resume (by retransmission) if the link comes back first. `restore()`
brings the port up again. This kernel has no `netem` (no `sch_netem`), so links cannot be given
delay, loss or reordering: a link is up or down.

Use it from a test with the `netns_hosts` fixture (tests/conftest.py):

    def test_something(netns_hosts):
        hosts = netns_hosts("redis", "c1", "w1", "client")
        redis = hosts["redis"].popen(["redis-server", "--bind", hosts["redis"].address])
        ...
        hosts["w1"].cut()
        hosts["w1"].restore()

Names are unique per network (a random tag), so tests may run side by side, and interface names
stay within the kernel's 15 characters. `Network.close()` (the fixture's teardown, which runs
whether the test passed or not) kills what still runs inside the namespaces, deletes them (which
deletes the veths) and the bridge. Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN);
`unavailable_reason()` tries once per session, and the fixture skips a test with that reason where
they cannot be made, so the rest of the suite still runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

CLONE_NEWNET = 0x40000000
IP_TIMEOUT_S = 10.0
OBSERVER_HOST_NUMBER = 254


def ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS` (inside `namespace` when given)."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    return subprocess.run([*prefix, "ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


@cache
def unavailable_reason() -> str | None:
    """Why hosts cannot be built here, or None when they can: tried once, with a namespace and a bridge."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    tag = f"gtprobe{os.getpid() % 100000}"
    try:
        for args in (("netns", "add", tag), ("link", "add", tag, "type", "bridge")):
            done = ip(*args, check=False)
            if done.returncode != 0:
                return f"cannot make network namespaces here (`ip {' '.join(args)}`: {done.stderr.strip()})"
        return None
    finally:
        ip("link", "del", tag, check=False)
        ip("netns", "del", tag, check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@dataclass
class Host:
    """One machine: a namespace, its address, and the bridge-side end of its link."""

    name: str
    namespace: str
    address: str
    veth: str  # the bridge-side end, in the root namespace: what `cut()` takes down
    _children: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` on this host (`ip netns exec` execs it: the Popen's pid is the program's)."""
        proc = subprocess.Popen([*self.prefix, *argv], **kwargs)
        self._children.append(proc)
        return proc

    def cut(self) -> None:
        """Take the host's link down: nothing it sends arrives, nothing reaches it; no error is raised."""
        ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        """Bring the host's link up again."""
        ip("link", "set", self.veth, "up")

    @property
    def is_cut(self) -> bool:
        return "state DOWN" in ip("link", "show", self.veth).stdout

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the `with` block's network calls on this host: the calling thread (only it) joins the
        namespace and goes back on exit. Sockets opened inside stay on this host after the block."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.namespace}") as there:
            _setns(there.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())


class Network:
    """A bridge and the hosts on it; `close()` removes everything it made."""

    def __init__(self) -> None:
        self.tag = f"gt{random.randrange(16**5):05x}"  # 7 characters: names below stay within 15
        self.bridge = f"{self.tag}br"
        self.subnet = _free_subnet()
        self.observer = str(self.subnet[OBSERVER_HOST_NUMBER])
        self.hosts: dict[str, Host] = {}
        self._made_bridge = False
        ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        ip("addr", "add", f"{self.observer}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        """A new host on the bridge, with the next address of the subnet."""
        number = len(self.hosts) + 1
        assert number < OBSERVER_HOST_NUMBER and name not in self.hosts
        namespace, veth = f"{self.tag}-{name}", f"{self.tag}v{number}"
        address = str(self.subnet[number])
        host = Host(name=name, namespace=namespace, address=address, veth=veth)
        ip("netns", "add", namespace)
        self.hosts[name] = host  # from here on close() removes it, whatever fails next
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        ip("link", "set", "lo", "up", namespace=namespace)
        ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0", namespace=namespace)
        ip("link", "set", "eth0", "up", namespace=namespace)
        return host

    def close(self) -> None:
        """Kill what still runs on the hosts, delete the namespaces (their veths go with them) and the bridge."""
        for host in self.hosts.values():
            for proc in host._children:
                if proc.poll() is None:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
            # Anything else started there (by `ip netns exec` from a test, say) would keep the namespace.
            pids = ip("netns", "pids", host.namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("link", "del", host.veth, check=False)
            ip("netns", "del", host.namespace, check=False)
        if self._made_bridge:
            ip("link", "del", self.bridge, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of the root namespace overlaps."""
    taken = [
        ipaddress.ip_network(word, strict=False)
        for line in ip("-4", "route", "show", "table", "all").stdout.splitlines()
        if (word := line.split()[0]) not in ("default", "local", "broadcast", "unreachable", "blackhole")
        and word[0].isdigit()
    ]
    taken += [
        ipaddress.ip_network(word, strict=False)
        for line in ip("-4", "-o", "addr", "show").stdout.splitlines()
        for word in line.split()
        if "/" in word and word[0].isdigit()
    ]
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.{random.randrange(64, 250)}.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken if isinstance(net, ipaddress.IPv4Network)):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 subnet found for the test network")
