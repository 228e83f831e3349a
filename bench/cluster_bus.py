"""How long a Redis Cluster takes to deliver an announcement: what the cluster rows' p99 in
docs/scaling.md comes from.

A `PUBLISH` reaches the subscribers of other nodes over the cluster bus, node to node. This measures,
on a cluster of three primaries made as the tests make one (tests/cluster.py), the delivery time of
messages sent at Poisson times, 100 a second, to a subscriber on the first primary:

- `PUBLISH` on the subscriber's own node (no bus);
- `PUBLISH` on another primary (over the bus), as a worker's finish in a cell of another primary is;
- `SPUBLISH` of a shard channel whose slot the subscriber's node serves, sent to that node as every
  `SPUBLISH` is (sharded pub/sub: a message stays within its channel's shard, a primary and its
  replicas, and its primary's own subscribers get it with no bus between).

    bench/.venv/bin/python bench/cluster_bus.py                        # the machine's redis-server
    bench/.venv/bin/python bench/cluster_bus.py --server PATH          # another server, such as valkey-server

Prints a Markdown table of p50, p90, p99 and the largest, in ms, and the share of messages over 10 ms.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis
from redis.cluster import key_slot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: the tests' cluster
import tests.cluster
from tests.cluster import ClusterDeployment

MESSAGES = 1000
RATE_PER_S = 100
SLOW_MS = 10.0


def _delivery_ms(publisher: Redis, subscriber: Redis, channel: str, sharded: bool) -> list[float]:
    """Each message's time from just before its send until the subscriber read it."""
    pubsub = subscriber.pubsub()
    if sharded:
        pubsub.ssubscribe(channel)
    else:
        pubsub.subscribe(channel)
    pubsub.get_message(timeout=5)  # the confirmation
    rng = random.Random(7)
    took = []
    for _ in range(MESSAGES):
        time.sleep(rng.expovariate(RATE_PER_S))
        sent = time.perf_counter()
        publisher.execute_command("SPUBLISH" if sharded else "PUBLISH", channel, repr(sent))
        while True:
            message = pubsub.get_message(timeout=5)
            if message is not None and message["type"] in ("message", "smessage"):
                break
        took.append((time.perf_counter() - float(message["data"])) * 1000)
    pubsub.close()
    return took


def _row(what: str, took: list[float]) -> str:
    took = sorted(took)

    def at(share: float) -> float:
        return took[min(len(took) - 1, int(share * len(took)))]

    slow = sum(1 for t in took if t > SLOW_MS) / len(took)
    return f"| {what} | {at(0.5):.2f} | {at(0.9):.2f} | {at(0.99):.2f} | {took[-1]:.2f} | {slow:.1%} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", help="the server binary of the nodes (default: the machine's redis-server)")
    args = parser.parse_args()
    if args.server:
        tests.cluster.redis_server_binary = lambda: args.server  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="gputorrent-bus-") as workdir, ClusterDeployment(Path(workdir)) as cluster:
        first, second = cluster.primaries()[:2]
        subscriber = Redis(host=first.address, port=first.port)
        own = Redis(host=first.address, port=first.port)
        other = Redis(host=second.address, port=second.port)
        version = own.info("server").get("valkey_version") or own.info("server")["redis_version"]
        # A shard channel whose slot the first primary serves.
        shard_channel = next(
            name for i in range(100_000) if cluster.primary_of(key_slot((name := f"ch{i}").encode())).port == first.port
        )
        rows = [
            _row("`PUBLISH` on the subscriber's node", _delivery_ms(own, subscriber, "ch", sharded=False)),
            _row("`PUBLISH` on another primary (over the bus)", _delivery_ms(other, subscriber, "ch", sharded=False)),
            _row("`SPUBLISH` on the channel's primary", _delivery_ms(own, subscriber, shard_channel, sharded=True)),
        ]
        for client in (subscriber, own, other):
            client.close()
    print(f"{MESSAGES} messages at {RATE_PER_S} a second, server {version}\n")
    print(f"| sent by | p50 ms | p90 ms | p99 ms | largest ms | over {SLOW_MS:.0f} ms |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
