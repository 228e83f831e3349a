"""The one way to make a Redis client from a URL: a single server, a primary found through Sentinel,
or a Redis Cluster.

`redis://` and `rediss://` (and `unix://`) URLs go to redis-py as they always did. A Sentinel URL
names the Sentinels and the primary's name; the client asks the Sentinels where the primary is on
every new connection, so after a failover the next connection goes to the new primary by itself:

    redis+sentinel://[[USERNAME]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?QUERY]
    rediss+sentinel://...   the same with TLS, to the Redis servers and to the Sentinels

The user part is the Redis servers' (primary and replicas) credentials, as in a `redis://` URL;
a HOST without a port is 26379. Query parameters (each once):

- `username`, `password`: the Redis servers' credentials, instead of the user part;
- `sentinel_username`, `sentinel_password`: the Sentinels' own (Sentinel's `requirepass`/ACL);
- `db`: the database number, instead of `/DB`;
- `sentinel_tls`: `false` to reach the Sentinels without TLS under `rediss+sentinel`;
- `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs` (`required`, `optional`, `none`),
  `ssl_check_hostname`: TLS files and checks, for the servers and the Sentinels alike.

A cluster URL names any of the cluster's nodes (seeds); the query takes `username`, `password` and
the TLS parameters above. A cluster has one database, so there is no `/DB`:

    redis+cluster://[[USERNAME]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/][?QUERY]
    rediss+cluster://...    the same with TLS

A cluster's client is redis-py's `RedisCluster`: it reads the slot map from the nodes and sends each
command to the primary serving its key's slot, following `MOVED` and `ASK` itself; every key of one
cell of the pool (`keys.py`) lies in one slot. The scripts on the hot path go through `pipelined.py`,
on a connection of its own to the node serving their slot, made by the cluster client's node.

>>> parse_sentinel_url("redis+sentinel://:pw@s1:26379,s2/pool/2?sentinel_password=spw").sentinels
(('s1', 26379), ('s2', 26379))
>>> print(redacted_url("redis+sentinel://u:pw@s1/pool?sentinel_password=spw"))
redis+sentinel://u:***@s1/pool?sentinel_password=***
>>> parse_cluster_url("redis+cluster://:pw@n1:7000,n2").seeds
(('n1', 7000), ('n2', 6379))
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import redis as sync_redis
import redis.cluster as sync_cluster
import redis.sentinel as sync_sentinel
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio import sentinel as async_sentinel
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.connection import parse_url
from redis.exceptions import RedisClusterUnreachableError, RedisError, SlotNotCoveredError

from gputorrent import keys, pipelined
from gputorrent.retry import Backoff

log = logging.getLogger(__name__)

# An asyncio client of the pool's Redis: one server (or the primary Sentinel names), or a Redis Cluster.
RedisClient: TypeAlias = Redis | RedisCluster
SyncRedisClient: TypeAlias = sync_redis.Redis | sync_redis.RedisCluster
# Every way a call can fail because Redis is out of reach or refuses: the callers answer 503 or try again.
# redis-py's cluster client raises the last two when no node answers, or none serves a key's slot;
# they are not `RedisError`s.
REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, OSError, RedisClusterUnreachableError, SlotNotCoveredError)

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379
_BOOL = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_QUERY = {"username", "password", "sentinel_username", "sentinel_password", "db", "sentinel_tls",
          "ssl_check_hostname", *_TLS_FILES}  # fmt: skip
_CLUSTER_QUERY = {"username", "password", "ssl_check_hostname", *_TLS_FILES}
_CERT_REQS = ("required", "optional", "none")
SWITCH_CHANNEL = "+switch-master"  # what a Sentinel publishes once it has failed a primary over
SENTINEL_SILENCE_S = 6.0  # a Sentinel subscription that hears nothing this long (pings included) is made anew


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message names what is wrong and never holds a password."""


@dataclass(frozen=True)
class SentinelTarget:
    """What a Sentinel URL says: where the Sentinels are, the primary's name, and how to talk to both."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinel_tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()

    def server_kwargs(self) -> dict[str, Any]:
        """Connection settings for the primary (and replicas)."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            kwargs.update(ssl=True, **dict(self.tls_options))
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection settings for the Sentinels themselves."""
        kwargs: dict[str, Any] = {"username": self.sentinel_username, "password": self.sentinel_password}
        if self.sentinel_tls:
            kwargs.update(ssl=True, **dict(self.tls_options))
        return kwargs


@dataclass(frozen=True)
class ClusterTarget:
    """What a cluster URL says: nodes to ask first, and how to talk to every node."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()

    def server_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            kwargs.update(ssl=True, **dict(self.tls_options))
        return kwargs


def redacted_url(url: str) -> str:
    """`url` with every password masked, for messages and logs."""
    url = re.sub(r"(://[^/@]*?:)[^@/]*@", r"\1***@", url)  # the user part's password
    return re.sub(r"(?i)((?:^|[?&])[a-z_]*password=)[^&]*", r"\1***", url)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def check_url(url: str) -> None:
    """Raise `RedisUrlError` naming what is wrong when `url` cannot make a client."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        return
    if is_cluster_url(url):
        parse_cluster_url(url)
        return
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise RedisUrlError(f"{e} ({redacted_url(url)})") from None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a `redis+sentinel://` or `rediss+sentinel://` URL (the module's docstring)."""
    shown = redacted_url(url)

    def bad(what: str) -> RedisUrlError:
        return RedisUrlError(f"Redis Sentinel URL {shown}: {what}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise bad("the scheme must be redis+sentinel:// or rediss+sentinel://")
    tls = SENTINEL_SCHEMES[scheme.lower()]
    # urlsplit cannot read a list of hosts as a netloc: split the authority off by hand.
    authority, _, path_and_query = rest.partition("/")
    userinfo, at, hosts_part = authority.rpartition("@")
    if not at:
        hosts_part, userinfo = authority, ""
    if "?" in hosts_part or "#" in hosts_part:
        raise bad("the primary's name is missing: give it as the path, e.g. .../mymaster")
    parts = urlsplit("x:///" + path_and_query)
    sentinels = tuple(_host_port(entry, bad) for entry in hosts_part.split(","))
    segments = [unquote(s) for s in parts.path.strip("/").split("/")] if parts.path.strip("/") else []
    if not segments or not segments[0]:
        raise bad("the primary's name is missing: give it as the path, e.g. .../mymaster")
    if len(segments) > 2:
        raise bad("the path must be /MASTER_NAME or /MASTER_NAME/DB")
    query = _query(parts.query, bad)
    username, password = _credentials(userinfo, query, bad)
    sentinel_tls = _flag(query["sentinel_tls"], "sentinel_tls", bad) if "sentinel_tls" in query else tls
    return SentinelTarget(
        sentinels=sentinels, master_name=segments[0], db=_database(segments[1:], query, bad),
        username=username, password=password,
        sentinel_username=query.get("sentinel_username") or None, sentinel_password=query.get("sentinel_password"),
        tls=tls, sentinel_tls=sentinel_tls, tls_options=_tls_options(query, tls or sentinel_tls, bad),
    )  # fmt: skip


def parse_cluster_url(url: str) -> ClusterTarget:
    """The parts of a `redis+cluster://` or `rediss+cluster://` URL (the module's docstring)."""
    shown = redacted_url(url)

    def bad(what: str) -> RedisUrlError:
        return RedisUrlError(f"Redis Cluster URL {shown}: {what}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise bad("the scheme must be redis+cluster:// or rediss+cluster://")
    tls = CLUSTER_SCHEMES[scheme.lower()]
    authority, _, path_and_query = rest.partition("/")
    authority, question, query_text = authority.partition("?")
    if question and path_and_query:
        raise bad("the path comes before the query")
    parts = urlsplit("x:///" + path_and_query)
    if parts.path.strip("/"):
        raise bad("a cluster has one database: the URL has no path (give db 0's nodes only)")
    userinfo, at, hosts_part = authority.rpartition("@")
    if not at:
        hosts_part, userinfo = authority, ""
    seeds = tuple(_host_port(entry, bad, DEFAULT_REDIS_PORT, "node") for entry in hosts_part.split(","))
    query = _query(query_text or parts.query, bad, _CLUSTER_QUERY)
    username, password = _credentials(userinfo, query, bad)
    tls_options = _tls_options(query, tls, bad, "rediss+cluster")
    return ClusterTarget(seeds=seeds, username=username, password=password, tls=tls, tls_options=tls_options)


def _query(text: str, bad: Any, known: set[str] = _QUERY) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, value in parse_qsl(text, keep_blank_values=True):
        if name not in known:
            raise bad(f"unknown query parameter {name!r} (known: {', '.join(sorted(known))})")
        if name in query:
            raise bad(f"query parameter {name!r} is given twice")
        query[name] = value
    return query


def _credentials(userinfo: str, query: dict[str, str], bad: Any) -> tuple[str | None, str | None]:
    """The Redis servers' user and password: from the user part, or from the query."""
    if "username" in query or "password" in query:
        if userinfo:
            raise bad("the Redis credentials are given twice: in the user part and as query parameters")
        return query.get("username") or None, query.get("password")
    if not userinfo:
        return None, None
    user, colon, secret = userinfo.partition(":")
    return unquote(user) or None, unquote(secret) if colon else None


def _database(path_db: list[str], query: dict[str, str], bad: Any) -> int:
    if "db" in query and path_db:
        raise bad("the database is given twice: in the path and as the db parameter")
    text = query.get("db", path_db[0] if path_db else "0")
    if not text.isdigit():
        raise bad(f"the database must be a number, not {text!r}")
    return int(text)


def _tls_options(
    query: dict[str, str], any_tls: bool, bad: Any, tls_scheme: str = "rediss+sentinel"
) -> tuple[tuple[str, Any], ...]:
    options: list[tuple[str, Any]] = [(name, query[name]) for name in _TLS_FILES if name in query]
    if query.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise bad(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {query['ssl_cert_reqs']!r}")
    if "ssl_check_hostname" in query:
        options.append(("ssl_check_hostname", _flag(query["ssl_check_hostname"], "ssl_check_hostname", bad)))
    if options and not any_tls:
        raise bad(f"TLS options are given but the scheme has no TLS (use {tls_scheme}:// for TLS)")
    return tuple(options)


def _host_port(
    entry: str, bad: Any, default_port: int = DEFAULT_SENTINEL_PORT, what: str = "Sentinel"
) -> tuple[str, int]:
    entry = entry.strip()
    if not entry:
        raise bad(f"a {what} address is empty: give HOST[:PORT],HOST[:PORT],...")
    if entry.startswith("["):  # [IPv6]:port
        host, close, after = entry[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise bad(f"the {what} address {entry!r} is not [IPV6]:PORT")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise bad(f"the {what} address {entry!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad(f"the port of {what} address {entry!r} must be a number from 1 to 65535")
    return host, int(port_text)


def _flag(value: str, name: str, bad: Any) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise bad(f"{name} must be true or false, not {value!r}") from None


# -- clients ----------------------------------------------------------------------------------------


class _AsyncSentinelPool(async_sentinel.SentinelConnectionPool):
    """The primary's pool; closing it (the client's `aclose`) also closes the Sentinel clients."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a whole close, not the drop of idle connections after a failover
            await self.sentinel_manager.aclose()


class _BlockingAsyncSentinelPool(_AsyncSentinelPool, BlockingConnectionPool):
    """Bounded like the coordinator's `BlockingConnectionPool`: past `max_connections` a caller waits
    up to `timeout` for a free connection instead of failing at once."""


class _SyncSentinelPool(sync_sentinel.SentinelConnectionPool):
    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:
            for client in self.sentinel_manager.sentinels:
                client.close()


UNBOUNDED = 2**31  # connections: what "no bound" was in redis-py before its default became 100


def async_client(
    url: str,
    *,
    decode_responses: bool = True,
    socket_connect_timeout: float = 5.0,
    socket_timeout: float | None = None,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
) -> RedisClient:
    """An asyncio client for `url`. `max_connections` bounds its pool, and a caller past the bound
    waits up to `pool_timeout` for a connection (a blocking pool); without it the pool is unbounded
    (redis-py's own default bound, 100 since its 6.x, failed a worker whose job slots each block on a
    connection). Closing the client closes its pool (and, for Sentinel, the Sentinel clients).

    Raises:
        RedisUrlError: the URL cannot be used.
    """
    common: dict[str, Any] = {
        "decode_responses": decode_responses,
        # A reply that is not UTF-8 is read with replacement characters, not an error that breaks the
        # connection: anyone who may publish on a channel (a worker, on `results:ready`) may send any bytes.
        "encoding_errors": "replace",
        "socket_connect_timeout": socket_connect_timeout,
        "socket_timeout": socket_timeout,
    }
    keys.use_cluster_layout(is_cluster_url(url))
    if is_cluster_url(url):
        cluster = parse_cluster_url(url)
        return RedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in cluster.seeds],
            # Per node; a caller past the bound fails at once (redis-py's cluster client does not wait).
            max_connections=UNBOUNDED if max_connections is None else max_connections,
            **common,
            **cluster.server_kwargs(),
        )
    if not is_sentinel_url(url):
        check_url(url)
        if max_connections is None:
            return Redis.from_url(url, max_connections=UNBOUNDED, **common)
        bounded = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout, **common)
        return Redis.from_pool(bounded)
    target = parse_sentinel_url(url)
    manager = async_sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=_sentinel_connection(target, socket_connect_timeout)
    )
    kwargs = {**common, **target.server_kwargs()}
    pool: async_sentinel.SentinelConnectionPool
    if max_connections is None:
        pool = _AsyncSentinelPool(target.master_name, manager, max_connections=UNBOUNDED, **kwargs)  # type: ignore[no-untyped-call]
    else:
        pool = _BlockingAsyncSentinelPool(  # type: ignore[no-untyped-call]
            target.master_name, manager, max_connections=max_connections, timeout=pool_timeout, **kwargs
        )
    return Redis.from_pool(pool)


def sync_client(
    url: str,
    *,
    decode_responses: bool = False,
    socket_connect_timeout: float = 5.0,
    socket_timeout: float | None = None,
) -> SyncRedisClient:
    """A blocking client for `url` (the worker's heartbeat thread, tests). Raises `RedisUrlError`."""
    common: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_connect_timeout": socket_connect_timeout,
        "socket_timeout": socket_timeout,
    }
    keys.use_cluster_layout(is_cluster_url(url))
    if is_cluster_url(url):
        cluster = parse_cluster_url(url)
        nodes = [sync_cluster.ClusterNode(host, port) for host, port in cluster.seeds]  # type: ignore[no-untyped-call]
        return sync_redis.RedisCluster(startup_nodes=nodes, **common, **cluster.server_kwargs())
    if not is_sentinel_url(url):
        check_url(url)
        return sync_redis.Redis.from_url(url, **common)
    target = parse_sentinel_url(url)
    manager = sync_sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=_sentinel_connection(target, socket_connect_timeout)
    )
    pool = _SyncSentinelPool(target.master_name, manager, **common, **target.server_kwargs())  # type: ignore[no-untyped-call]
    return sync_redis.Redis.from_pool(pool)


def _sentinel_connection(target: SentinelTarget, timeout_s: float) -> dict[str, Any]:
    # A Sentinel that does not answer within the connect timeout is skipped for the next one: finding
    # the primary must not take longer than connecting to it would.
    return {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, **target.sentinel_kwargs()}


def finds_primary_through_sentinel(redis: RedisClient) -> bool:
    return _sentinel_pool(redis) is not None


def _sentinel_pool(redis: RedisClient) -> async_sentinel.SentinelConnectionPool | None:
    if isinstance(redis, Redis) and isinstance(redis.connection_pool, async_sentinel.SentinelConnectionPool):
        return redis.connection_pool
    return None


async def still_primary(redis: RedisClient, run_id: str) -> bool:
    """Whether the client's Sentinels name the server with `run_id` as the primary, with no failover of
    it under way: every one that answers, and most of them. True for a client of a single Redis
    (nobody else could be primary).

    Every one, not most: in a failover only the Sentinel that leads it knows at first (the others
    learn the new primary from it a second or two after it has switched)."""
    if (pool := _sentinel_pool(redis)) is None:
        return True
    sentinels = pool.sentinel_manager.sentinels
    answers = await asyncio.gather(
        *(sentinel.execute_command("SENTINEL MASTER", pool.service_name) for sentinel in sentinels),
        return_exceptions=True,
    )
    confirming = 0
    for state in answers:
        if isinstance(state, BaseException):
            continue  # out of reach: it confirms nothing
        if not isinstance(state, dict):
            return False
        flags = state.get("flags", "")
        flags = set(flags.split(",")) if isinstance(flags, str) else set(flags)
        if state.get("runid") != run_id or flags & {"failover_in_progress", "s_down", "o_down"}:
            return False
        confirming += 1
    return confirming > len(sentinels) // 2


async def reconnect(redis: RedisClient) -> None:
    """Close `redis`'s idle connections and its shared ones (`pipelined`): each new one asks the
    Sentinels where the primary is (a cluster client, its nodes). Those in use end with their command."""
    pipelined.drop(redis)
    if isinstance(redis, RedisCluster):
        await redis.nodes_manager.initialize()
    else:
        await redis.connection_pool.disconnect(inuse_connections=False)


async def follow_failovers(
    redis: RedisClient, on_switch: Callable[[str], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Until `stop`: hear every Sentinel of `redis` announce a failover of its primary (`+switch-master`)
    and call `on_switch` with the new primary's address. Returns at once for a client of a single Redis.

    redis-py asks the Sentinels only for a new connection; the old primary may live on and take writes
    for seconds after the switch (until a Sentinel makes it a replica), and whatever it takes then is
    lost. Sentinel clients are meant to listen for the switch (as Jedis and Lettuce do): each Sentinel
    is heard, since in a failover only the one leading it knows at first."""
    if (pool := _sentinel_pool(redis)) is None:
        return
    switched_to = ""

    async def switched(address: str) -> None:  # each Sentinel announces it: act on the first
        nonlocal switched_to
        if address != switched_to:
            switched_to = address
            await on_switch(address)

    async with asyncio.TaskGroup() as tasks:
        for sentinel in pool.sentinel_manager.sentinels:
            tasks.create_task(_hear_switches(sentinel, pool.service_name, switched, stop))


async def _hear_switches(
    sentinel: Redis, master_name: str, on_switch: Callable[[str], Awaitable[None]], stop: asyncio.Event
) -> None:
    backoff = Backoff(max_s=SENTINEL_SILENCE_S)
    while not stop.is_set():
        pubsub = sentinel.pubsub()
        try:
            await pubsub.subscribe(SWITCH_CHANNEL)
            heard_at = pinged_at = time.monotonic()
            while not stop.is_set():
                message = await pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is not None:
                    heard_at = now
                    backoff.reset()
                    # "<master name> <old ip> <old port> <new ip> <new port>"
                    data = message["data"] if message["type"] == "message" else b""
                    fields = (data.decode(errors="replace") if isinstance(data, bytes) else str(data)).split()
                    if len(fields) == 5 and fields[0] == master_name:
                        await on_switch(f"{fields[3]}:{fields[4]}")
                if now - heard_at > SENTINEL_SILENCE_S:
                    raise ConnectionError("the Sentinel went silent")  # a cut link: subscribe anew
                if now - pinged_at >= SENTINEL_SILENCE_S / 3:
                    await pubsub.ping()
                    pinged_at = now
        except (sync_redis.RedisError, OSError) as e:
            log.debug("not hearing failovers from a Sentinel (%s); retrying in %.1f s", e, backoff.delay_s)
            await backoff.wait()
        finally:
            await pubsub.aclose()
