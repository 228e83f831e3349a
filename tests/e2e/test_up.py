"""`gputorrent up` end to end: private Redis, coordinator and llama.cpp workers on the packaged models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from gputorrent.embedded import free_port
from tests.conftest import wait_for

UP_TIMEOUT_S = 180.0  # first run assembles the 253 MB model from its package


def _try_block(log: str) -> str:
    """The shell lines `up` prints under "Try:"."""
    block = log.split("Try:\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


@pytest.mark.model
def test_up_serves_a_real_completion_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT")}
    env["GPUTORRENT_HOME"] = str(tmp_path / "home")  # where up keeps the admin key it makes
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log_file:
        up = subprocess.Popen(
            [sys.executable, "-m", "gputorrent", "up", "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for(lambda: "Try:" in log_path.read_text() or up.poll() is not None, UP_TIMEOUT_S, "the pool to start")
        log = log_path.read_text()
        assert up.poll() is None, log
        assert "started a private Redis-compatible server" in log
        assert f"GPU Torrent is up at http://127.0.0.1:{port}" in log
        pool = psutil.Process(up.pid).children(recursive=True)
        assert len(pool) >= 4  # Redis, coordinator, a worker a model

        # The first run made an admin key, printed it once and kept it for this user only.
        key_file = tmp_path / "home" / "api-key"
        key = key_file.read_text().strip()
        assert key in log and "created an admin API key" in log
        assert key_file.stat().st_mode & 0o777 == 0o600
        auth = {"Authorization": f"Bearer {key}"}

        # The seed's flow: POST /inference, then GET /result/{id}; with the key, as nothing answers without one.
        base = f"http://127.0.0.1:{port}"
        request = {"model": "gemma3:270m", "prompt": "The capital of France is", "options": {"max_tokens": 12}}
        assert httpx.post(f"{base}/inference", json=request, timeout=10).status_code == 401
        accepted = httpx.post(f"{base}/inference", json=request, timeout=10, headers=auth)
        assert accepted.status_code == 202
        result = httpx.get(
            f"{base}/result/{accepted.json()['request_id']}", params={"wait": 60}, timeout=90, headers=auth
        ).json()
        assert result["status"] == "completed", result
        assert result["output"].strip()
        assert result["usage"]["prompt_tokens"] > 0
        assert 0 < result["usage"]["completion_tokens"] <= 12

        # The curl line printed for the user works as printed: a chat on the instruction-tuned model.
        shown = subprocess.run(
            ["bash", "-c", _try_block(log)], capture_output=True, text=True, timeout=120,
            env={**env, "GPUTORRENT_API_KEY": key},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        printed = json.loads(shown.stdout)
        assert printed["model"] == "smollm2:135m" and printed["choices"][0]["message"]["content"].strip()
        served = {m["id"] for m in httpx.get(f"{base}/v1/models", headers=auth, timeout=10).json()["data"]}
        assert served == {"smollm2:135m", "gemma3:270m"}

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, log_path.read_text()
        for proc in pool:
            assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, f"{proc.cmdline()} left behind"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_refuses_a_port_in_use_instead_of_joining_whatever_listens_there() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gputorrent", "up", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr
    assert "GPU Torrent is up" not in done.stdout
