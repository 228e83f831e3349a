"""Redis Cluster clients side by side on the hot path's shape (issue #22): redis-py, valkey-glide, coredis.

A Redis Cluster mode needs a cluster client; this picks one by measurement. The benchmark starts its
own cluster (the tests' `tests/cluster.py`: three primaries, no replicas, real `redis-server`
processes on free localhost ports, built with `redis-cli --cluster create`), connects each client to it and
measures, alternating between the clients in rounds of 100 calls (the first client of a round
rotates) so that noise falls on all of them alike:

- a script call shaped like the take script: `EVALSHA` of a small Lua script (one `LLEN`, so the
  server's share is small and the same for all) with 14 keys sharing one hash tag (`{c7}queue:w1`,
  `{c7}processing:w1`, ...) and 8 string arguments, through each client's plainest EVALSHA
  (redis-py's and coredis' `evalsha`, glide's `custom_command`), and through each client's script
  helper (redis-py's and coredis' `register_script`, glide's `invoke_script`);
- `SET key value EX 60` then `GET key` on a tagged key, two awaits, and the pair in one
  non-transactional pipeline (glide: a `ClusterBatch`);
- the plain script call from 8 callers at once (the CPU is the whole batch's over its calls).

Each client's latency is its p50 and p99 a call; its CPU is the benchmark process's CPU time
(`time.process_time`, every thread: glide's Rust threads and the event loop included) a call. On
uvloop, as the coordinator and the worker run. It also counts the connections each client holds
to the hash tag's node, checks that no call is sent to a node that does not own the slot (the
servers' own command counts), and tries each client's script paths after `SCRIPT FLUSH` (NOSCRIPT).
A client that is not installed, or fails a shape, is reported as such in the table.

    bench/.venv/bin/python bench/cluster_clients.py --calls 3000

Prints a Markdown table and writes bench/results/cluster_clients.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pool import summary, version, write_result
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: the tests' cluster
from tests.cluster import ClusterDeployment

SCRIPT = "return redis.call('LLEN', KEYS[1])"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
TAG = "{c7}"
KEYS = [
    f"{TAG}{name}"
    for name in (
        "queue:w1",
        "processing:w1",
        "leases:w1",
        "inflight:w1",
        "heartbeat:w1",
        "capacity:w1",
        "admitted:t1",
        "tokens:t1",
        "budget:t1",
        "models:m1",
        "workers",
        "results:r1",
        "stream:r1",
        "meta:r1",
    )
]
ARGS = ["r1", "w1", "t1", "m1", "1700000000.123456", "30000", "gemma-3-270m", "priority:normal"]
SET_KEY = f"{TAG}lease:r1"
VALUE = "x" * 100
ROUND = 100  # calls a client makes before the next client's turn
TOGETHER_ROUND = 400  # calls a client makes a turn with 8 callers at once (50 each)
WARMUP = 200
CONCURRENCY = 8
ROUTED_COMMANDS = ("cmdstat_evalsha", "cmdstat_set", "cmdstat_get")

CLIENTS = {"redis_py": "redis-py", "glide": "valkey-glide", "coredis": "coredis"}
SHAPES = {
    "script": "EVALSHA, 14 keys + 8 args",
    "script_helper": "EVALSHA, the library's script helper",
    "set_get": "SET EX + GET, two awaits",
    "set_get_batch": "SET EX + GET, one pipeline",
    "script_8": "EVALSHA, 8 callers at once",
}
PACKAGES = ("redis", "hiredis", "valkey-glide", "coredis", "uvloop", "anyio")

Call = Callable[[], Awaitable[object]]


class Inspector:
    """Plain connections to each node: connection counts, command counts, the script cache."""

    def __init__(self, ports: list[int]) -> None:
        self.nodes = {port: Redis(host="127.0.0.1", port=port, decode_responses=True) for port in ports}

    async def connections(self, port: int) -> int:
        return int((await self.nodes[port].info("clients"))["connected_clients"])

    async def routed(self) -> dict[int, int]:
        """Calls (and rejected calls: MOVED, ASK) of the measured commands, node by node."""
        counts = {}
        for port, node in self.nodes.items():
            stats = await node.info("commandstats")
            counts[port] = sum(
                int(stats[name].get("calls", 0)) + int(stats[name].get("rejected_calls", 0))
                for name in ROUTED_COMMANDS
                if name in stats
            )
        return counts

    async def flush_scripts(self) -> None:
        for node in self.nodes.values():
            await node.script_flush()

    async def load_script(self) -> None:
        for node in self.nodes.values():
            await node.script_load(SCRIPT)

    async def aclose(self) -> None:
        for node in self.nodes.values():
            await node.aclose()


# The clients ---------------------------------------------------------------------------------------


class RedisPyClient:
    """redis-py's `redis.asyncio.cluster.RedisCluster` (hiredis parses its replies when installed)."""

    def __init__(self, port: int) -> None:
        self.client = RedisCluster(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)
        self.helper = self.client.register_script(SCRIPT)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        stack.push_async_callback(self.client.aclose)
        await self.client.initialize()

    async def script(self) -> object:
        return await self.client.evalsha(SHA, len(KEYS), *KEYS, *ARGS)

    async def script_helper(self) -> object:
        return await self.helper(keys=KEYS, args=ARGS)

    async def set_get(self) -> object:
        await self.client.set(SET_KEY, VALUE, ex=60)
        return await self.client.get(SET_KEY)

    async def set_get_batch(self) -> object:
        async with self.client.pipeline() as pipe:
            pipe.set(SET_KEY, VALUE, ex=60)
            pipe.get(SET_KEY)
            return await pipe.execute()


class GlideClient:
    """valkey-glide's `GlideClusterClient` (a Rust core on its own threads; replies come back through a pipe)."""

    def __init__(self, port: int) -> None:
        import glide

        glide.Logger.set_logger_config(glide.LogLevel.ERROR)  # its WARN lines would report the NOSCRIPT probe
        self.glide = glide
        self.config = glide.GlideClusterClientConfiguration(
            addresses=[glide.NodeAddress("127.0.0.1", port)], request_timeout=5000
        )
        self.helper = glide.Script(SCRIPT)  # type: ignore[no-untyped-call]
        self.expiry = glide.ExpirySet(glide.ExpiryType.SEC, 60)
        self.command: list[str | bytes] = ["EVALSHA", SHA, str(len(KEYS)), *KEYS, *ARGS]

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        self.client = await self.glide.GlideClusterClient.create(self.config)
        stack.push_async_callback(self.client.close)

    async def script(self) -> object:
        return await self.client.custom_command(self.command)

    async def script_helper(self) -> object:
        return await self.client.invoke_script(self.helper, keys=list(KEYS), args=list(ARGS))

    async def set_get(self) -> object:
        await self.client.set(SET_KEY, VALUE, expiry=self.expiry)
        return await self.client.get(SET_KEY)

    async def set_get_batch(self) -> object:
        batch = self.glide.ClusterBatch(is_atomic=False)
        batch.set(SET_KEY, VALUE, expiry=self.expiry)
        batch.get(SET_KEY)
        return await self.client.exec(batch, raise_on_error=True)


class CoredisClient:
    """coredis' `RedisCluster` (anyio underneath, here on asyncio and uvloop)."""

    def __init__(self, port: int) -> None:
        import coredis

        self.client = coredis.RedisCluster(host="127.0.0.1", port=port, decode_responses=True, stream_timeout=5)
        self.helper = self.client.register_script(SCRIPT)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        await stack.enter_async_context(self.client)

    async def script(self) -> object:
        return await self.client.evalsha(SHA, keys=KEYS, args=ARGS)

    async def script_helper(self) -> object:
        return await self.helper(keys=KEYS, args=ARGS)

    async def set_get(self) -> object:
        await self.client.set(SET_KEY, VALUE, ex=60)
        return await self.client.get(SET_KEY)

    async def set_get_batch(self) -> object:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(SET_KEY, VALUE, ex=60)
            got = pipe.get(SET_KEY)
        return await got


FACTORIES: dict[str, Callable[[int], Any]] = {
    "redis_py": RedisPyClient,
    "glide": GlideClient,
    "coredis": CoredisClient,
}


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


# The measurements ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, clients: dict[str, Any], inspector: Inspector, tag_port: int, calls: int) -> None:
        self.clients = clients
        self.inspector = inspector
        self.tag_port = tag_port
        self.calls = calls
        self.failed: dict[str, dict[str, str]] = {name: {} for name in clients}
        self.connections: dict[str, int] = dict.fromkeys(clients, 0)

    def _live(self, shape: str) -> dict[str, Call]:
        return {name: getattr(client, shape.removesuffix("_8")) for name, client in self.clients.items()}

    def _fail(self, live: dict[str, Call], name: str, shape: str, error: BaseException) -> None:
        self.failed[name][shape] = describe(error)
        live.pop(name, None)

    @staticmethod
    def _turns(live: dict[str, Call], turn: int) -> list[str]:
        names = list(live)
        return names[turn % len(names) :] + names[: turn % len(names)] if names else []

    async def one_at_a_time(self, shape: str) -> dict[str, Any]:
        live = self._live(shape)
        for name, call in list(live.items()):
            try:
                for _ in range(WARMUP):
                    await call()
            except Exception as error:
                self._fail(live, name, shape, error)
        latency: dict[str, list[float]] = {name: [] for name in live}
        cpu: dict[str, list[float]] = {name: [] for name in live}
        per_turn = min(ROUND, self.calls)
        for turn in range(max(1, self.calls // per_turn)):
            for name in self._turns(live, turn):
                call = live[name]
                try:
                    for _ in range(per_turn):
                        started, started_cpu = time.perf_counter(), time.process_time()
                        await call()
                        latency[name].append((time.perf_counter() - started) * 1e6)
                        cpu[name].append((time.process_time() - started_cpu) * 1e6)
                except Exception as error:
                    self._fail(live, name, shape, error)
        return {
            name: {
                "latency": summary(latency[name]),
                "cpu_us": sum(cpu[name]) / len(cpu[name]),
                "count": len(cpu[name]),
            }
            for name in live
        }

    async def _batch(self, call: Call, each: int) -> tuple[list[float], float, float]:
        latency: list[float] = []

        async def caller() -> None:
            for _ in range(each):
                started = time.perf_counter()
                await call()
                latency.append((time.perf_counter() - started) * 1e6)

        started, started_cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        return latency, time.process_time() - started_cpu, time.perf_counter() - started

    async def together(self, shape: str) -> dict[str, Any]:
        live = self._live(shape)
        for name, call in list(live.items()):  # opens the connections concurrent callers need: counted
            before = await self.inspector.connections(self.tag_port)
            try:
                await self._batch(call, WARMUP // CONCURRENCY)
            except Exception as error:
                self._fail(live, name, shape, error)
            self.connections[name] += await self.inspector.connections(self.tag_port) - before
        figures: dict[str, dict[str, Any]] = {name: {"latency": [], "cpu_s": 0.0, "wall_s": 0.0} for name in live}
        each = max(1, min(TOGETHER_ROUND, self.calls) // CONCURRENCY)
        for turn in range(max(1, self.calls // (each * CONCURRENCY))):
            for name in self._turns(live, turn):
                try:
                    latency, cpu_s, wall_s = await self._batch(live[name], each)
                except Exception as error:
                    self._fail(live, name, shape, error)
                    continue
                figures[name]["latency"] += latency
                figures[name]["cpu_s"] += cpu_s
                figures[name]["wall_s"] += wall_s
        return {
            name: {
                "latency": summary(f["latency"]),
                "cpu_us": f["cpu_s"] * 1e6 / len(f["latency"]),
                "calls_per_s": len(f["latency"]) / f["wall_s"],
                "count": len(f["latency"]),
            }
            for name, f in figures.items()
            if name in live
        }

    async def misrouted(self) -> dict[str, dict[str, int]]:
        """Commands each shape sent to nodes other than the tag's (redirected with MOVED): 0 when routed right."""
        found: dict[str, dict[str, int]] = {}
        for name, client in self.clients.items():
            found[name] = {}
            for shape in ("script", "script_helper", "set_get", "set_get_batch"):
                if shape in self.failed[name]:
                    continue
                before = await self.inspector.routed()
                with contextlib.suppress(Exception):
                    for _ in range(20):
                        await getattr(client, shape)()
                after = await self.inspector.routed()
                found[name][shape] = sum(after[port] - before[port] for port in after if port != self.tag_port)
        return found

    async def noscript(self) -> dict[str, dict[str, str]]:
        """What each script path does when the servers' script cache is empty (a restarted or new node)."""
        found: dict[str, dict[str, str]] = {}
        for name, client in self.clients.items():
            found[name] = {}
            for shape in ("script", "script_helper"):
                await self.inspector.flush_scripts()
                try:
                    await getattr(client, shape)()
                    found[name][shape] = "recovers (loads the script, retries)"
                except Exception as error:
                    found[name][shape] = f"raises {describe(error)}"
        await self.inspector.load_script()
        return found


async def open_clients(
    ports: list[int], inspector: Inspector, tag_port: int, stack: contextlib.AsyncExitStack
) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
    """Each client that can be installed and connected, in turn; and the connections it opened to the tag's node."""
    clients: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    connections: dict[str, int] = {}
    for name, factory in FACTORIES.items():
        before = await inspector.connections(tag_port)
        try:
            client = factory(ports[0])
        except ImportError as error:
            unavailable[name] = f"not installed ({describe(error)})"
            continue
        try:
            await client.open(stack)
            await client.set_get()
        except Exception as error:
            unavailable[name] = f"could not connect or call ({describe(error)})"
            continue
        clients[name] = client
        connections[name] = await inspector.connections(tag_port) - before
    return clients, unavailable, connections


async def measure(cluster: ClusterDeployment, calls: int) -> dict[str, Any]:
    ports = [node.port for node in cluster.nodes]
    inspector = Inspector(ports)
    owner = cluster.primary_of(key_slot(KEYS[0].encode()))
    assert owner is not None
    tag_port = owner.port
    try:
        await inspector.load_script()
        async with contextlib.AsyncExitStack() as stack:
            clients, unavailable, connections = await open_clients(ports, inspector, tag_port, stack)
            bench = Bench(clients, inspector, tag_port, calls)
            shapes: dict[str, Any] = {}
            for shape in SHAPES:
                if shape.endswith("_8"):
                    shapes[shape] = await bench.together(shape)
                else:
                    shapes[shape] = await bench.one_at_a_time(shape)
            misrouted = await bench.misrouted()
            noscript = await bench.noscript()
        return {
            "shapes": shapes,
            "failed": {name: failed for name, failed in bench.failed.items() if failed},
            "unavailable": unavailable,
            "connections_to_tag_node": {
                name: {"idle": connections[name], "with_8_callers": connections[name] + bench.connections[name]}
                for name in clients
            },
            "misrouted_calls": misrouted,
            "noscript": noscript,
        }
    finally:
        await inspector.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="measured calls per client per shape")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with (
        tempfile.TemporaryDirectory(prefix="gputorrent-cluster-") as workdir,
        ClusterDeployment(Path(workdir)) as cluster,
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        measured = runner.run(measure(cluster, args.calls))
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    result: dict[str, Any] = {
        "calls": args.calls,
        "uvloop": loop_factory is not None,
        "redis_server": server.split(" v=")[1].split()[0] if " v=" in server else server.strip(),
        "versions": {package: version(package) for package in PACKAGES},
        **measured,
    }
    write_result("cluster_clients", result)
    print(table(result))
    return 0


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _misrouted(counts: dict[str, int]) -> str:
    return "none" if not any(counts.values()) else ", ".join(f"{shape} {n}" for shape, n in counts.items() if n)


def table(result: dict[str, Any]) -> str:
    """The Markdown table: each shape, each client, and its ratios to redis-py's cluster client."""
    rows = [
        "| shape | client | p50 (µs) | p99 (µs) | CPU a call (µs) | p50 vs redis-py | CPU vs redis-py |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, label in SHAPES.items():
        figures = result["shapes"][shape]
        base = figures.get("redis_py")
        for name, client_label in CLIENTS.items():
            if name in result["unavailable"]:
                rows.append(f"| {label} | {client_label} | {result['unavailable'][name]} | | | | |")
            elif name not in figures:
                rows.append(f"| {label} | {client_label} | failed: {result['failed'][name][shape]} | | | | |")
            else:
                f = figures[name]
                p50, p99, cpu = f["latency"]["p50"], f["latency"]["p99"], f["cpu_us"]
                vs_p50 = _ratio(p50, base["latency"]["p50"] if base else None)
                vs_cpu = _ratio(cpu, base["cpu_us"] if base else None)
                rows.append(f"| {label} | {client_label} | {p50:.0f} | {p99:.0f} | {cpu:.0f} | {vs_p50} | {vs_cpu} |")
    notes = [f"\n{result['calls']} calls a client a shape, uvloop {'on' if result['uvloop'] else 'off'}, Redis "]
    notes.append(f"{result['redis_server']}; " + ", ".join(f"{p} {v}" for p, v in result["versions"].items() if v))
    rows.append("".join(notes) + ".")
    for name, counts in result["connections_to_tag_node"].items():
        throughput = result["shapes"]["script_8"].get(name, {}).get("calls_per_s")
        rows.append(
            f"- {CLIENTS[name]}: {counts['idle']} connection(s) to the tag's node after one call, "
            f"{counts['with_8_callers']} with 8 callers"
            + (f"; {throughput:.0f} script calls/s with 8 callers" if throughput else "")
            + f"; calls sent to other nodes: {_misrouted(result['misrouted_calls'][name])}; after SCRIPT FLUSH: "
            + "; ".join(f"{path} {what}" for path, what in result["noscript"][name].items())
            + "."
        )
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
