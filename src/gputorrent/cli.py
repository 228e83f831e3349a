"""The `gputorrent` command: up, coordinator, worker, infer, workers.

Flags win over environment variables, which win over defaults; the names of both are in
`config.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from gputorrent import __version__, heap, logs
from gputorrent.config import PACKAGED_CHAT_MODEL, PACKAGED_MODEL, CoordinatorSettings, ShardSettings, WorkerSettings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    log_format = args.log_format or os.environ.get(logs.FORMAT_VARIABLE, "text").lower()
    if log_format not in ("text", "json"):
        parser.error(f"{logs.FORMAT_VARIABLE} must be text or json, not {log_format!r}")
    os.environ[logs.FORMAT_VARIABLE] = log_format  # the processes `up` starts log the same way
    logs.configure(args.log_level, "json" if log_format == "json" else "text")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the pool's own events
    handler = {
        "up": _up,
        "coordinator": _coordinator,
        "worker": _worker,
        "shard": _shard,
        "infer": _infer,
        "workers": _workers,
        "keys": _keys,
        "status": _status,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


def _overrides(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags the user gave (not None), as settings keyword arguments."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _coordinator(args: argparse.Namespace) -> int:
    import uvicorn

    from gputorrent.coordinator.app import create_app

    overrides = _overrides(args, "host", "port", "redis_url")
    if args.no_auth:
        overrides["auth"] = False
    settings = CoordinatorSettings(**overrides)
    if (problem := _bad_redis_url("coordinator", settings.redis_url)) is not None:
        return problem
    if not settings.auth and not _is_loopback(settings.host):
        print(
            f"gputorrent coordinator: refusing to run without authentication on {settings.host}: anyone who can "
            "reach it could use the pool. Bind to 127.0.0.1, or keep authentication on (see `gputorrent keys`).",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings)
    heap.freeze_startup_objects()
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False,
        log_config=None,  # uvicorn's lines go through our handler: same format, request ids, secrets masked
    )  # fmt: skip
    return 0


def _worker(args: argparse.Namespace) -> int:
    from gputorrent.worker.main import run_worker

    settings = WorkerSettings(
        **_overrides(
            args, "coordinator_url", "redis_url", "link", "backend", "model_name", "worker_id", "slots",
            "ollama_host", "openai_base_url", "join_token", "split",
        )
    )  # fmt: skip
    if settings.link == "redis" and (problem := _bad_redis_url("worker", settings.redis_url)) is not None:
        return problem

    heap.freeze_startup_objects()
    try:
        with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
            runner.run(_until_signalled(functools.partial(run_worker, settings)))
    except Exception as e:  # the outermost boundary: one clear line, not a traceback
        logging.getLogger("gputorrent.worker").error("worker stopped: %s", e)
        return 1
    return 0


def _shard(args: argparse.Namespace) -> int:
    from gputorrent.llama_tools import ToolsMissing
    from gputorrent.shard import ShardRefused, run_shard

    log = logging.getLogger("gputorrent.shard")
    overrides = _overrides(args, "coordinator_url", "join_token", "listen", "memory_bytes", "shard_id")
    if args.allow_public:
        overrides["allow_public"] = True
    try:
        settings = ShardSettings(**overrides)
    except ValidationError as e:
        fields = {str(err["loc"][0]) for err in e.errors()}
        if "GPUTORRENT_SHARD_LISTEN" in fields or "listen" in fields:
            log.error(
                "shard host not started: give --listen HOST:PORT, an address of this machine on a private network"
            )
        else:
            log.error("shard host not started: %s", "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in e.errors()))
        return 2

    try:
        asyncio.run(_until_signalled(functools.partial(run_shard, settings)))
    except (ShardRefused, ToolsMissing) as e:
        log.error("shard host not started: %s", e)
        return 2
    except Exception as e:  # the outermost boundary: one clear line, not a traceback
        log.error("shard host stopped: %s", e)
        return 1
    return 0


async def _until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """`run(stop)`, with SIGINT and SIGTERM setting `stop` (a worker drains, a shard host leaves)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)


def _bad_redis_url(command: str, url: str) -> int | None:
    """Exit status 2, with one line naming what is wrong, when the Redis URL cannot be used."""
    from gputorrent.redis_client import RedisUrlError, check_url

    try:
        check_url(url)
    except RedisUrlError as e:
        print(f"gputorrent {command}: REDIS_URL (or --redis-url): {e}", file=sys.stderr)
        return 2
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _keys(args: argparse.Namespace) -> int:
    """Manage API keys straight in Redis: the operator's side, and how the first admin key is made."""
    from gputorrent import auth, redis_client

    redis_url = CoordinatorSettings(**_overrides(args, "redis_url")).redis_url
    if (problem := _bad_redis_url("keys", redis_url)) is not None:
        return problem

    async def run() -> int:
        redis = redis_client.async_client(redis_url)
        try:
            if args.keys_command == "create":
                info, key = await auth.create_key(redis, args.name, args.scope)
                print(key)
                print(f"created {info.scope} key {info.key_id} ({info.name}); it is shown only now", file=sys.stderr)
            elif args.keys_command == "list":
                for info in await auth.list_keys(redis):
                    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at))
                    print(f"{info.key_id}  {info.scope:<6}  {created}  {info.name}")
            elif not await auth.revoke_key(redis, args.key_id):
                print(f"no key with id {args.key_id}", file=sys.stderr)
                return 1
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(run())


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (it comes with uvicorn[standard]): less overhead per Redis and HTTP call."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _up(args: argparse.Namespace) -> int:
    from gputorrent.up import default_key_file, run_up

    return run_up(
        host=args.host, port=args.port, models=args.model or [PACKAGED_CHAT_MODEL, PACKAGED_MODEL],
        log_level=args.log_level, key_file=default_key_file(),
        no_auth=args.no_auth,
    )  # fmt: skip


def _infer(args: argparse.Namespace) -> int:
    from gputorrent.client import APIClient
    from gputorrent.errors import GPUTorrentError

    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    with APIClient(args.url) as client:
        try:
            result = client.infer(args.model, args.prompt, options={k: v for k, v in options.items() if v is not None})
        except GPUTorrentError as e:
            print(f"error: {e.code}: {e.message}", file=sys.stderr)
            return 1
    print(result.output)
    return 0


def _status(args: argparse.Namespace) -> int:
    from gputorrent.status import run

    return run(args.url, os.environ.get("GPUTORRENT_API_KEY"), watch=args.watch, interval_s=args.interval)


def _workers(args: argparse.Namespace) -> int:
    from gputorrent.client import APIClient
    from gputorrent.errors import GPUTorrentError

    with APIClient(args.url) as client:
        try:
            workers = client.workers()
        except GPUTorrentError as e:
            print(f"error: {e.code}: {e.message}", file=sys.stderr)
            return 1
    rows = [("WORKER", "STATE", "BACKEND", "MODELS", "SLOTS", "IN FLIGHT", "QUEUED", "HARDWARE")]
    for w in workers:
        gpus = ", ".join(g.name for g in w.hardware.gpus)
        hardware = gpus or f"{w.hardware.cpu_cores or '?'} CPU cores"
        rows.append((w.worker_id, w.state, w.backend, ",".join(w.models), str(w.slots), str(w.jobs_in_flight),
                     str(w.queue_length), hardware))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not workers:
        print("(no workers registered)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gputorrent", description="Pool GPU machines behind one inference endpoint.")
    parser.add_argument("--version", action="version", version=f"gputorrent {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", choices=["text", "json"], help=f"text (default) or JSON lines ({logs.FORMAT_VARIABLE})"
    )
    sub = parser.add_subparsers(dest="command")
    default_url = os.environ.get("COORDINATOR_URL", "http://localhost:8000")

    up = sub.add_parser("up", help="run a whole pool here: private Redis, coordinator, llama.cpp workers")
    up.add_argument("--host", default="127.0.0.1", help="address the coordinator listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="coordinator port (default 8000)")
    up.add_argument(
        "--model", action="append",
        help=f"a GGUF path or packaged model to serve, a worker each; repeat for more (default: {PACKAGED_CHAT_MODEL} "
        f"for chat and {PACKAGED_MODEL})",
    )  # fmt: skip
    up.add_argument("--no-auth", action="store_true", help="no API keys: only with a loopback --host")

    coordinator = sub.add_parser("coordinator", help="run the coordinator (env: REDIS_HOST, REDIS_PORT, REDIS_URL)")
    coordinator.add_argument("--host", help="listen address (GPUTORRENT_HOST, default 127.0.0.1)")
    coordinator.add_argument("--port", type=int, help="listen port (GPUTORRENT_PORT, default 8000)")
    coordinator.add_argument("--redis-url", help="Redis URL; overrides REDIS_HOST/REDIS_PORT")
    coordinator.add_argument(
        "--no-auth", action="store_true", help="no API keys (GPUTORRENT_AUTH=off): only when bound to loopback"
    )

    worker = sub.add_parser("worker", help="run a worker that joins a coordinator")
    worker.add_argument("--coordinator", dest="coordinator_url", help="COORDINATOR_URL (default http://localhost:8000)")
    worker.add_argument("--redis-url", help="REDIS_URL (default redis://localhost:6379)")
    worker.add_argument(
        "--link", choices=["redis", "coordinator"],
        help="GPUTORRENT_LINK: redis (default; needs Redis credentials) or coordinator (no Redis: every call goes "
        "through the coordinator with the worker's secret, for machines you do not trust with Redis)",
    )  # fmt: skip
    worker.add_argument(
        "--backend", choices=["llamacpp", "ollama", "openai", "fake"], help="GPUTORRENT_BACKEND (default ollama)"
    )
    worker.add_argument("--model", dest="model_name", help="MODEL_NAME (default: the backend's default model)")
    worker.add_argument(
        "--split", help="GPUTORRENT_SPLIT (llamacpp): serve the model split over this machine and shard hosts "
        "(`gputorrent shard`): auto, a number of hosts, or 0 for llama-server alone",
    )  # fmt: skip
    worker.add_argument(
        "--token", dest="join_token", help="a join key (GPUTORRENT_JOIN_TOKEN; the variable keeps it out of `ps`)"
    )
    worker.add_argument("--worker-id", help="GPUTORRENT_WORKER_ID (default: host name plus a random suffix)")
    worker.add_argument("--slots", type=int, help="GPUTORRENT_SLOTS: jobs run at once (default 1)")
    worker.add_argument("--ollama-host", help="OLLAMA_HOST (default http://localhost:11434)")
    worker.add_argument("--openai-base-url", help="OPENAI_BASE_URL (default http://localhost:8080/v1)")

    shard = sub.add_parser(
        "shard", help="lend this machine's memory and compute to a model split over machines (ggml-rpc-server)"
    )
    shard.add_argument(
        "--listen", help="HOST:PORT for ggml-rpc-server (GPUTORRENT_SHARD_LISTEN), HOST an address of this machine on "
        "a private network: it has no authentication",
    )  # fmt: skip
    shard.add_argument(
        "--allow-public", action="store_true",
        help="GPUTORRENT_SHARD_ALLOW_PUBLIC: let --listen be a public address or every interface (docs/security.md)",
    )  # fmt: skip
    shard.add_argument("--coordinator", dest="coordinator_url", help="COORDINATOR_URL (default http://localhost:8000)")
    shard.add_argument("--token", dest="join_token", help="a join key (GPUTORRENT_JOIN_TOKEN)")
    shard.add_argument("--memory-bytes", type=int, help="GPUTORRENT_SHARD_MEMORY_BYTES: lend at most this much")
    shard.add_argument("--shard-id", help="GPUTORRENT_SHARD_ID (default: one is given)")

    infer = sub.add_parser("infer", help="send a prompt and print the answer")
    infer.add_argument("prompt")
    infer.add_argument("--model", default=PACKAGED_MODEL)
    infer.add_argument("--url", default=default_url, help="coordinator URL (COORDINATOR_URL)")
    infer.add_argument("--max-tokens", type=int)
    infer.add_argument("--temperature", type=float)
    infer.add_argument("--seed", type=int)

    status = sub.add_parser("status", help="the pool: workers, queues, rates (key: GPUTORRENT_API_KEY)")
    status.add_argument("--url", default=default_url, help="coordinator URL (COORDINATOR_URL)")
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument("--interval", type=_positive_seconds, default=2.0, help="seconds between refreshes (default 2)")

    workers = sub.add_parser("workers", help="list the pool's workers")
    workers.add_argument("--url", default=default_url, help="coordinator URL (COORDINATOR_URL)")

    keys = sub.add_parser("keys", help="create, list or revoke API keys (talks to Redis: REDIS_URL or --redis-url)")
    keys.add_argument("--redis-url", help="Redis URL; overrides REDIS_HOST/REDIS_PORT")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key and print it (shown only once)")
    create.add_argument("--name", default="unnamed", help="what the key is for")
    create.add_argument(
        "--scope", default="client", choices=["client", "admin", "join"],
        help="client: send requests; admin: everything; join: register workers (default client)",
    )  # fmt: skip
    keys_sub.add_parser("list", help="every key: id, scope, creation time, name (never the secret)")
    revoke = keys_sub.add_parser("revoke", help="delete a key: it stops working at once")
    revoke.add_argument("key_id")
    return parser


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.1 and 3600 seconds")
    return seconds
