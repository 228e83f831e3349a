"""The `gputorrent` command: up, coordinator, worker, infer, workers.

Flags win over environment variables, which win over defaults; the names of both are in
`config.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from gputorrent import __version__
from gputorrent.config import PACKAGED_MODEL, CoordinatorSettings, WorkerSettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the pool's own events
    handler = {
        "up": _up,
        "coordinator": _coordinator,
        "worker": _worker,
        "infer": _infer,
        "workers": _workers,
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

    settings = CoordinatorSettings(**_overrides(args, "host", "port", "redis_url"))
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level, access_log=False
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from gputorrent.worker.main import run_worker

    settings = WorkerSettings(
        **_overrides(
            args, "coordinator_url", "redis_url", "backend", "model_name", "worker_id", "slots",
            "ollama_host", "openai_base_url",
        )
    )  # fmt: skip

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    try:
        with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
            runner.run(serve())
    except Exception as e:  # the outermost boundary: one clear line, not a traceback
        logging.getLogger("gputorrent.worker").error("worker stopped: %s", e)
        return 1
    return 0


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (it comes with uvicorn[standard]): less overhead per Redis and HTTP call."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _up(args: argparse.Namespace) -> int:
    from gputorrent.up import run_up

    return run_up(host=args.host, port=args.port, model=args.model, log_level=args.log_level)


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
    sub = parser.add_subparsers(dest="command")
    default_url = os.environ.get("COORDINATOR_URL", "http://localhost:8000")

    up = sub.add_parser("up", help="run a whole pool here: private Redis, coordinator, one llama.cpp worker")
    up.add_argument("--host", default="127.0.0.1", help="address the coordinator listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="coordinator port (default 8000)")
    up.add_argument("--model", default=PACKAGED_MODEL, help=f"GGUF path or {PACKAGED_MODEL} (default)")

    coordinator = sub.add_parser("coordinator", help="run the coordinator (env: REDIS_HOST, REDIS_PORT, REDIS_URL)")
    coordinator.add_argument("--host", help="listen address (GPUTORRENT_HOST, default 127.0.0.1)")
    coordinator.add_argument("--port", type=int, help="listen port (GPUTORRENT_PORT, default 8000)")
    coordinator.add_argument("--redis-url", help="Redis URL; overrides REDIS_HOST/REDIS_PORT")

    worker = sub.add_parser("worker", help="run a worker that joins a coordinator")
    worker.add_argument("--coordinator", dest="coordinator_url", help="COORDINATOR_URL (default http://localhost:8000)")
    worker.add_argument("--redis-url", help="REDIS_URL (default redis://localhost:6379)")
    worker.add_argument(
        "--backend", choices=["llamacpp", "ollama", "openai", "fake"], help="GPUTORRENT_BACKEND (default ollama)"
    )
    worker.add_argument("--model", dest="model_name", help="MODEL_NAME (default: the backend's default model)")
    worker.add_argument("--worker-id", help="GPUTORRENT_WORKER_ID (default: host name plus a random suffix)")
    worker.add_argument("--slots", type=int, help="GPUTORRENT_SLOTS: jobs run at once (default 1)")
    worker.add_argument("--ollama-host", help="OLLAMA_HOST (default http://localhost:11434)")
    worker.add_argument("--openai-base-url", help="OPENAI_BASE_URL (default http://localhost:8080/v1)")

    infer = sub.add_parser("infer", help="send a prompt and print the answer")
    infer.add_argument("prompt")
    infer.add_argument("--model", default=PACKAGED_MODEL)
    infer.add_argument("--url", default=default_url, help="coordinator URL (COORDINATOR_URL)")
    infer.add_argument("--max-tokens", type=int)
    infer.add_argument("--temperature", type=float)
    infer.add_argument("--seed", type=int)

    workers = sub.add_parser("workers", help="list the pool's workers")
    workers.add_argument("--url", default=default_url, help="coordinator URL (COORDINATOR_URL)")
    return parser
