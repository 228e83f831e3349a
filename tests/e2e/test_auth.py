"""Authentication on real processes: keys made with `gputorrent keys`, a worker joining with a join
key, the official clients sending their keys, and no secret in any log."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anthropic
import ollama
import openai
import pytest

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.errors import JobFailed, Unauthorized
from gputorrent.worker.backends.fake import FAIL_TRIGGER
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, healthy, keys_cli, new_key, wait_for

HF_TOKEN = "hf_test_token_that_must_never_be_logged"


@dataclass
class SecuredPool:
    url: str
    client_key: str
    join_key: str
    processes: list[Process]


@pytest.fixture
def pool(processes: Callable[..., Process], redis_url: str) -> Iterator[SecuredPool]:
    """A coordinator with authentication on (the default) and one fake worker that joined with a join key."""
    client_key, join_key = new_key(redis_url, "client"), new_key(redis_url, "join", name="workers")
    port = free_port()
    timing = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "4"}
    coordinator = processes(
        "coordinator", "--port", str(port), "--redis-url", redis_url, name="coordinator", env=timing
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: healthy(url), PROCESS_START_TIMEOUT_S, "the coordinator")
    worker = processes(
        "worker", "--backend", "fake", "--coordinator", url, "--redis-url", redis_url, "--worker-id", "w1",
        name="worker", env={"GPUTORRENT_JOIN_TOKEN": join_key, "HF_TOKEN": HF_TOKEN},
    )  # fmt: skip
    with APIClient(url, api_key=client_key) as client:
        wait_for(lambda: worker.popen.poll() is not None or _alive(client), PROCESS_START_TIMEOUT_S, "the worker")
    assert worker.popen.poll() is None, worker.log
    yield SecuredPool(url=url, client_key=client_key, join_key=join_key, processes=[coordinator, worker])


def _alive(client: APIClient) -> bool:
    return any(w.state == "alive" for w in client.workers())


def test_the_official_clients_send_their_keys_and_a_wrong_key_is_their_auth_error(pool: SecuredPool) -> None:
    with openai.OpenAI(base_url=f"{pool.url}/v1", api_key=pool.client_key, max_retries=0) as good:
        reply = good.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi there"}])
        assert reply.choices[0].message.content == "echo: hi there"
    wrong_key = "gt_000000000000_" + "x" * 43
    with (
        openai.OpenAI(base_url=f"{pool.url}/v1", api_key=wrong_key, max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()

    with anthropic.Anthropic(base_url=pool.url, api_key=pool.client_key, max_retries=0) as claude:
        message = claude.messages.create(
            model="fake", max_tokens=8, messages=[{"role": "user", "content": "hello claude"}]
        )
        assert message.content[0].text == "echo: hello claude"  # type: ignore[union-attr]
    with (
        anthropic.Anthropic(base_url=pool.url, api_key="wrong", max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError),
    ):
        wrong.messages.create(model="fake", max_tokens=8, messages=[{"role": "user", "content": "x"}])

    with ollama.Client(host=pool.url, headers={"Authorization": f"Bearer {pool.client_key}"}) as keyed:
        assert keyed.generate(model="fake", prompt="hi ollama", stream=False).response == "echo: hi ollama"
    with ollama.Client(host=pool.url) as keyless:
        with pytest.raises(ollama.ResponseError) as refused:
            keyless.list()
        assert refused.value.status_code == 401


def test_the_cli_reads_its_key_from_the_environment_and_revoking_it_locks_it_out(
    pool: SecuredPool, redis_url: str
) -> None:
    def infer() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gputorrent", "infer", "one two", "--model", "fake", "--url", pool.url],
            capture_output=True, text=True, timeout=60, env={**_env(), "GPUTORRENT_API_KEY": pool.client_key},
        )  # fmt: skip

    assert infer().stdout.strip() == "echo: one two"
    listed = keys_cli(redis_url, "list").stdout
    key_id = pool.client_key.split("_")[1]
    assert key_id in listed and pool.client_key not in listed
    keys_cli(redis_url, "revoke", key_id)
    refused = infer()
    assert refused.returncode == 1 and "unauthorized" in refused.stderr


def _env() -> dict[str, str]:
    return dict(os.environ)


def test_no_secret_reaches_any_log(pool: SecuredPool) -> None:
    """Keys, the join key and HF_TOKEN travel through every process of a full run; no log holds one."""
    with APIClient(pool.url, api_key=pool.client_key) as client:
        assert client.infer("fake", "a request", options={"max_tokens": 2}).output == "echo: a"
        with pytest.raises(JobFailed):  # a failing job: its error travels through both logs
            client.infer("fake", f"please {FAIL_TRIGGER}")
    with APIClient(pool.url, api_key="gt_000000000000_" + "y" * 43) as intruder, pytest.raises(Unauthorized):
        intruder.workers()
    for proc in pool.processes:
        proc.stop()
        log = proc.log
        assert log, f"{proc.log_path} is empty"
        for secret in (pool.client_key, pool.join_key, HF_TOKEN, "y" * 43):
            assert secret not in log, f"a secret is in {proc.log_path}"


def test_running_without_keys_is_refused_off_loopback(redis_url: str) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "gputorrent", "coordinator", "--no-auth", "--host", "0.0.0.0", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 2
    assert "refusing to run without authentication" in started.stderr
