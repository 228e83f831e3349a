"""`POST /api/pull` on real processes, driven by the official `ollama` client: a coordinator with keys,
and workers on the `ollama` backend, one linked to Redis and one to the coordinator alone, each in
front of its own stand-in for Ollama's documented protocol — NOT a real Ollama (no Ollama binary can be
installed here; see tests/ollama_standin.py for what the stand-in answers)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import ollama
import pytest

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, healthy, new_key, wait_for, wait_until_alive
from tests.ollama_standin import CHAT_REPLY, PULL_NOT_FOUND, OllamaProtocolStandin, standin_in_thread

NO_REDIS = "redis://127.0.0.1:1"  # nothing listens there: a worker that used Redis would fail
NEW_MODEL = "qwen2.5:0.5b"  # in every stand-in's registry, on no stand-in at first
HF_MODEL = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
REGISTRY = {NEW_MODEL, HF_MODEL, "qwen2.5:1.5b"}


@dataclass
class Pool:
    url: str
    redis_url: str
    admin_key: str
    client_key: str
    join_key: str
    processes: Callable[..., Process]

    def client(self, key: str) -> ollama.Client:
        return ollama.Client(host=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def start_worker(self, worker_id: str, *args: str, env: dict[str, str] | None = None) -> Process:
        """A worker joining with the join key; waits until the coordinator lists it alive."""
        worker = self.processes(
            "worker", "--coordinator", self.url, "--worker-id", worker_id, *args, name=f"worker-{worker_id}",
            env={"GPUTORRENT_JOIN_TOKEN": self.join_key, **(env or {})},
        )  # fmt: skip
        wait_until_alive(worker, worker_id, self.url, self.client_key)
        return worker

    def ollama_worker(self, worker_id: str, standin: OllamaProtocolStandin, *, redis: bool = True) -> Process:
        """A worker on the `ollama` backend in front of `standin`, linked to Redis or to the coordinator alone."""
        link = ["--redis-url", self.redis_url] if redis else ["--link", "coordinator"]
        env = {} if redis else {"REDIS_URL": NO_REDIS}
        return self.start_worker(worker_id, "--backend", "ollama", "--ollama-host", standin.url, *link, env=env)


@pytest.fixture
def pool(processes: Callable[..., Process], redis_url: str) -> Iterator[Pool]:
    """A coordinator with authentication on; workers are started by each test."""
    admin_key, client_key, join_key = (new_key(redis_url, scope) for scope in ("admin", "client", "join"))
    port = free_port()
    timing = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "4"}
    processes("coordinator", "--port", str(port), "--redis-url", redis_url, name="coordinator", env=timing)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: healthy(url), PROCESS_START_TIMEOUT_S, "the coordinator")
    yield Pool(url, redis_url, admin_key, client_key, join_key, processes)


def _tags(client: ollama.Client) -> list[str | None]:
    return [m.model for m in client.list().models]


def test_the_ollama_client_pulls_onto_both_kinds_of_worker_with_progress_then_generates_documented_protocol(
    pool: Pool,
) -> None:
    with (
        standin_in_thread(registry=REGISTRY) as first,
        standin_in_thread(registry=REGISTRY) as second,
        pool.client(pool.admin_key) as admin,
    ):
        pool.ollama_worker("w-redis", first)
        pool.ollama_worker("w-link", second, redis=False)
        pool.start_worker("w-fake", "--backend", "fake", "--redis-url", pool.redis_url)  # cannot pull

        parts = list(admin.pull(NEW_MODEL, stream=True))
        assert all(isinstance(p, ollama.ProgressResponse) for p in parts)
        assert [p.status for p in parts].count("success") == 1 and parts[-1].status == "success"
        statuses = {p.status for p in parts}
        assert {"pulling manifest", "pulled onto worker w-redis", "pulled onto worker w-link"} <= statuses
        downloads = [p for p in parts if p.digest]
        assert len({p.digest for p in downloads}) == 1 and {p.completed for p in downloads} >= {1000, 2500, 4000}
        for standin in (first, second):
            assert [r.body for r in standin.requests_to("/api/pull")] == [{"model": NEW_MODEL, "stream": True}]

        # Listed by every worker that pulled, without a restart; a generation on it works.
        assert NEW_MODEL in _tags(admin)
        reply = admin.generate(model=NEW_MODEL, prompt="Hello there", stream=False)
        assert reply.response == CHAT_REPLY and reply.done
        with APIClient(pool.url, api_key=pool.client_key) as client:
            models = {w.worker_id: w.models for w in client.workers()}
        assert NEW_MODEL in models["w-redis"] and NEW_MODEL in models["w-link"] and NEW_MODEL not in models["w-fake"]

        # Each line names its worker in a field Ollama's clients ignore; without streaming, one object.
        headers = {"Authorization": f"Bearer {pool.admin_key}"}
        body = {"model": HF_MODEL}
        with httpx.stream("POST", f"{pool.url}/api/pull", json=body, headers=headers, timeout=60) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert lines[-1] == {"status": "success"}
        assert {line["worker"] for line in lines[:-1]} == {"w-redis", "w-link"}
        assert admin.pull("qwen2.5:1.5b", stream=False) == ollama.ProgressResponse(status="success")
        assert {"qwen2.5:1.5b", HF_MODEL} <= set(_tags(admin))


def test_a_restarted_ollama_worker_serves_every_model_its_ollama_has_documented_protocol(pool: Pool) -> None:
    """A worker registers with its `--model` and every other model its Ollama has: Ollama loads any
    of them when asked, so a restart does not lose the models pulled before it."""
    with standin_in_thread() as standin, pool.client(pool.admin_key) as admin:
        worker = pool.ollama_worker("w1", standin)
        assert admin.pull(NEW_MODEL, stream=False).status == "success"
        assert worker.stop() == 0

        pool.ollama_worker("w1", standin)  # started as before: `--model` is still only the default
        with APIClient(pool.url, api_key=pool.client_key) as client:
            (restarted,) = client.workers()
        # Ollama lists the default model as `llama3.2:latest`: the same model, registered once.
        assert restarted.models == ["llama3.2", NEW_MODEL] and standin.models == ["llama3.2:latest", NEW_MODEL]
        assert admin.generate(model=NEW_MODEL, prompt="Hello there", stream=False).response == CHAT_REPLY


def test_a_failed_pull_is_the_clients_response_error_naming_the_worker_documented_protocol(pool: Pool) -> None:
    with (
        standin_in_thread() as has_it,
        standin_in_thread(registry=set()) as lacks_it,
        pool.client(pool.admin_key) as admin,
    ):
        pool.ollama_worker("w1", has_it)
        pool.ollama_worker("w2", lacks_it, redis=False)
        with pytest.raises(ollama.ResponseError) as streamed:
            list(admin.pull(NEW_MODEL, stream=True))
        expected = (
            f"the pull of '{NEW_MODEL}' failed on worker w2: Ollama could not pull '{NEW_MODEL}': {PULL_NOT_FOUND}"
        )
        assert streamed.value.error == expected
        assert _tags(admin).count(NEW_MODEL) == 1  # w1 has it: listed once, served by w1 alone

        with pytest.raises(ollama.ResponseError) as whole:
            admin.pull("no-such-model:7b", stream=False)
        assert whole.value.status_code == 502
        assert "failed on workers w1, w2" in whole.value.error and PULL_NOT_FOUND in whole.value.error


def test_a_client_key_may_pull_a_served_model_but_not_start_a_download(pool: Pool) -> None:
    with standin_in_thread() as standin, pool.client(pool.client_key) as client:
        pool.ollama_worker("w1", standin)
        assert client.pull("llama3.2", stream=False).status == "success"  # served already: nothing to download
        assert [p.status for p in client.pull("llama3.2:latest", stream=True)] == ["success"]
        with pytest.raises(ollama.ResponseError) as refused:
            client.pull(NEW_MODEL)
        assert refused.value.status_code == 403 and "needs an admin key" in refused.value.error
        assert standin.requests_to("/api/pull") == [] and NEW_MODEL not in _tags(client)


def test_a_pool_with_no_worker_that_can_pull_says_so(pool: Pool) -> None:
    pool.start_worker("w-fake", "--backend", "fake", "--redis-url", pool.redis_url)
    with pool.client(pool.admin_key) as admin:
        assert admin.pull("fake", stream=False).status == "success"  # served already
        with pytest.raises(ollama.ResponseError) as unable:
            list(admin.pull(NEW_MODEL, stream=True))
        assert unable.value.status_code == 503
        assert unable.value.error.startswith(f"no live worker can pull '{NEW_MODEL}': their backends (fake)")


def test_a_client_that_leaves_a_pull_stops_it_and_frees_its_worker_documented_protocol(pool: Pool) -> None:
    # Nine progress lines 2 s apart: an 18 s download, were it not stopped.
    with standin_in_thread(pull_line_delay_s=2.0) as standin, pool.client(pool.admin_key) as admin:
        pool.ollama_worker("w1", standin)  # one slot: a generation waits while a pull runs
        headers = {"Authorization": f"Bearer {pool.admin_key}"}
        with httpx.stream("POST", f"{pool.url}/api/pull", json={"model": NEW_MODEL}, headers=headers) as response:
            lines = (json.loads(line) for line in response.iter_lines() if line)
            assert next(line for line in lines if line["status"] == "pulling manifest")["worker"] == "w1"
        left_at = time.monotonic()
        reply = admin.generate(model="llama3.2", prompt="Hello there", stream=False)
        assert reply.response == CHAT_REPLY
        assert time.monotonic() - left_at < 12  # the pull stopped at its next line, not after the download
        assert NEW_MODEL not in _tags(admin) and NEW_MODEL not in standin.models
