"""`gputorrent up`: a whole pool on this machine, stopped as one by Ctrl-C.

Starts a private Redis-compatible server (unless `REDIS_URL` or `REDIS_HOST` names one), the
coordinator and a llama.cpp worker per model (by default the packaged chat model and Gemma 3
270M), each its own process, and stops every one of them on SIGINT or SIGTERM, or when any of them
dies: the workers first, Redis last.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

import httpx

from gputorrent import redis_client
from gputorrent.config import PACKAGED_CHAT_MODEL
from gputorrent.embedded import EmbeddedRedis
from gputorrent.redis_client import REDIS_FAILURES, RedisClient

T = TypeVar("T")

START_TIMEOUT_S = 180.0  # the worker assembles and loads the model before it registers
STOP_TIMEOUT_S = 10.0


class _Stop(Exception):
    pass


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if `up` itself is killed, so nothing is left behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_up(*, host: str, port: int, models: list[str], log_level: str, key_file: Path, no_auth: bool = False) -> int:
    def on_signal(signum: int, _: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    embedded: EmbeddedRedis | None = None
    children: list[subprocess.Popen[bytes]] = []
    join_id: str | None = None
    try:
        _check_port_free(host, port)
        if "REDIS_URL" not in env and "REDIS_HOST" not in env:
            embedded = EmbeddedRedis().start(preexec_fn=_die_with_parent, start_new_session=True)
            env["REDIS_URL"] = embedded.url
            print(f"started a private Redis-compatible server at {embedded.url}", flush=True)
        # Both children read REDIS_URL from the environment, not a flag: a password in it would be
        # readable by every local user in the process list.
        env["REDIS_URL"] = env.get("REDIS_URL") or f"redis://{env['REDIS_HOST']}:{env.get('REDIS_PORT', '6379')}"
        api_key = None
        if no_auth:
            env["GPUTORRENT_AUTH"] = "off"
        else:
            api_key, first_run = _admin_key(env["REDIS_URL"], key_file)
            # The worker joins with a join key of its own, passed (like REDIS_URL) through the environment.
            join_id, env["GPUTORRENT_JOIN_TOKEN"] = _join_key(env["REDIS_URL"])
            print(_key_notice(api_key, key_file, first_run), flush=True)
        local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{local_host}:{port}"
        python = [sys.executable, "-m", "gputorrent", "--log-level", log_level]
        children.append(_spawn([*python, "coordinator", "--host", host, "--port", str(port)], env))
        _wait_until(lambda: _get(f"{url}/health") is not None, children, "the coordinator to answer /health")
        for model in models:  # a llama.cpp context holds one model: a worker each
            worker = ["worker", "--backend", "llamacpp", "--model", model, "--coordinator", url]
            children.append(_spawn([*python, *worker], env))
        _wait_until(
            lambda: _alive_models(url, api_key) >= set(models), children, f"the workers to load {', '.join(models)}"
        )
        print(_banner(url, models, authenticated=api_key is not None), flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("a process of the pool exited; stopping the rest", file=sys.stderr, flush=True)
        return 1
    except _Stop:
        return 0
    except RuntimeError as e:
        print(f"gputorrent up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):  # the workers first, so they leave the pool cleanly
            terminate(child)
        if join_id is not None:  # the workers' join key dies with the pool
            _revoke(env["REDIS_URL"], join_id)
        if embedded is not None:
            embedded.stop()
        print("stopped", flush=True)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a taken port up front: otherwise `up` would find whatever answers there and join it."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"port {port} on {host} is in use ({e.strerror}); choose another with --port") from None


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only `up`, which stops the pool in order.
    return subprocess.Popen(args, env=env, preexec_fn=_die_with_parent, start_new_session=True)


def terminate(child: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop a child process: SIGTERM (its clean shutdown), then SIGKILL past `timeout_s`."""
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _wait_until(ready: object, children: list[subprocess.Popen[bytes]], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise RuntimeError(f"a process exited while waiting for {what}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def _get(url: str, api_key: str | None = None) -> httpx.Response | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, timeout=2, headers=headers)
    except httpx.TransportError:
        return None
    return response if response.status_code == 200 else None


def _alive_models(url: str, api_key: str | None) -> set[str]:
    """The models the pool's alive workers serve."""
    response = _get(f"{url}/workers", api_key)
    workers = response.json() if response is not None else []
    return {model for w in workers if w["state"] == "alive" for model in w["models"]}


def _banner(url: str, models: list[str], *, authenticated: bool) -> str:
    """Where things are, and a chat to try, printed to run as it is: on the chat model when it is served."""
    chat_model = PACKAGED_CHAT_MODEL if PACKAGED_CHAT_MODEL in models else models[0]
    body = f'{{"model": "{chat_model}", "messages": [{{"role": "user", "content": "Name three colors."}}]}}'
    auth = ' -H "Authorization: Bearer $GPUTORRENT_API_KEY"' if authenticated else ""
    return (
        f"\nGPU Torrent is up at {url} (Ctrl-C stops it), serving {', '.join(models)}\n"
        f"Dashboard and playground: {url}/dashboard (or open {url} in a browser)\n"
        "Try:\n"
        f"  curl -s {url}/v1/chat/completions{auth} -H 'content-type: application/json' \\\n"
        f"    -d '{body}'\n"
    )


def default_key_file() -> Path:
    """Where `up` keeps the admin key it made: `GPUTORRENT_HOME`, else ~/.config/gputorrent."""
    home = os.environ.get("GPUTORRENT_HOME") or os.path.join(os.path.expanduser("~"), ".config", "gputorrent")
    return Path(home) / "api-key"


def _admin_key(redis_url: str, key_file: Path) -> tuple[str, bool]:
    """The admin key saved by an earlier run (stored again: a private Redis starts empty), or a new
    one saved readable by this user only. Returns it and whether it is new."""
    from gputorrent import auth

    first_run = not key_file.exists()
    if first_run:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        _, key = auth.new_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as saved:
            saved.write(key + "\n")
    key = key_file.read_text().strip()
    asyncio.run(_with_redis(redis_url, lambda redis: auth.store_key(redis, key, "gputorrent up", "admin")))
    return key, first_run


def _join_key(redis_url: str) -> tuple[str, str]:
    from gputorrent import auth

    info, key = asyncio.run(
        _with_redis(redis_url, lambda redis: auth.create_key(redis, "gputorrent up worker", "join"))
    )
    return info.key_id, key


def _revoke(redis_url: str, key_id: str) -> None:
    from gputorrent import auth

    try:
        asyncio.run(_with_redis(redis_url, lambda redis: auth.revoke_key(redis, key_id)))
    except REDIS_FAILURES as e:
        print(f"could not revoke the worker's join key {key_id} ({e}); `gputorrent keys revoke {key_id}`", flush=True)


async def _with_redis(redis_url: str, action: Callable[[RedisClient], Awaitable[T]]) -> T:
    redis = redis_client.async_client(redis_url, socket_connect_timeout=5)
    try:
        return await action(redis)
    finally:
        await redis.aclose()


def _key_notice(api_key: str, key_file: Path, first_run: bool) -> str:
    if first_run:
        return (
            f"created an admin API key, saved in {key_file} (readable by you only):\n  {api_key}\n"
            f"send it as `Authorization: Bearer <key>`; e.g. export GPUTORRENT_API_KEY=$(cat {key_file})"
        )
    return f"the admin API key is in {key_file} (export GPUTORRENT_API_KEY=$(cat {key_file}))"
