"""The documented Redis users survive a Sentinel failover: kill -9 of the primary under ACLs.

Redis does not replicate ACL users, so docs/security.md has every server load the same users.acl
(`default off`, `coordinator`, `worker`, and the `replica` and `sentinel` users replication and
Sentinel need). Here a primary, a replica and three Sentinels (with their own password) run exactly
that file; a coordinator and a fake-backend worker reach them as `coordinator` and `worker` through a
Sentinel URL. After the primary is killed and the replica promoted, the same processes serve again
with the API key made before the kill, and the new primary refuses the worker user `apikey:*`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.retry import Retry

from gputorrent.client import APIClient
from gputorrent.embedded import free_port
from gputorrent.errors import ResultTimeout, ServiceUnavailable
from gputorrent.protocol import JobResult
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, documented_users_acl, healthy, new_key, wait_for
from tests.sentinel import SentinelDeployment, ServerUsers

pytestmark = pytest.mark.fault

# The passwords documented_users_acl() gives the docs' placeholders, and the Sentinels' own.
COORDINATOR = ("coordinator", "coordinator-pw")
WORKER = ("worker", "worker-pw")
USERS = ServerUsers(
    acl=documented_users_acl(),
    replica=("replica", "replica-pw"),
    sentinel=("sentinel", "sentinel-user-pw"),
    sentinel_password="sentinels-own-pw",
)
# A refused login is a ConnectionError to redis-py, retried with backoff by default: once is enough.
NO_RETRY = Retry(NoBackoff(), 0)
SECRETS = ("coordinator-pw", "worker-pw", "sentinels-own-pw")
# From the kill: Sentinel's detection (1 s) and promotion, then a request the worker answers.
SERVING_AGAIN_TIMEOUT_S = 20.0


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    with SentinelDeployment(tmp_path / "redis", users=USERS) as started:
        yield started


def test_the_documented_users_and_an_earlier_api_key_work_on_the_promoted_replica(
    deployment: SentinelDeployment, processes: Callable[..., Process]
) -> None:
    coordinator_url = deployment.url_for(*COORDINATOR)
    worker_url = deployment.url_for(*WORKER)
    client_key = new_key(coordinator_url, "client")  # `gputorrent keys` as the coordinator user
    join_key = new_key(coordinator_url, "join")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    timing = {"GPUTORRENT_HEARTBEAT_INTERVAL_S": "0.5", "GPUTORRENT_HEARTBEAT_TIMEOUT_S": "4"}
    # REDIS_URL in the environment, as operations.md gives it: a password in argv is visible in `ps`.
    coordinator = processes(
        "coordinator", "--port", str(port), name="coordinator", env={**timing, "REDIS_URL": coordinator_url}
    )
    wait_for(lambda: healthy(base) or coordinator.popen.poll() is not None, PROCESS_START_TIMEOUT_S, "/health")
    assert coordinator.popen.poll() is None, coordinator.log
    worker = processes(
        "worker", "--backend", "fake", "--coordinator", base, "--worker-id", "acl-w1", name="worker",
        env={"REDIS_URL": worker_url, "GPUTORRENT_JOIN_TOKEN": join_key},
    )  # fmt: skip
    with APIClient(base, api_key=client_key) as client:
        wait_for(lambda: worker.popen.poll() is not None or _serves(client, "before") is not None,
                 PROCESS_START_TIMEOUT_S, "a first answer from acl-w1")  # fmt: skip
        assert worker.popen.poll() is None, worker.log

        old_port, _ = deployment.kill_primary()
        promoted = deployment.wait_for_failover(old_port)

        # The same processes and the key made before the kill: served again once the replica is primary.
        # A 401 (the key unknown) or a failed job is raised, not waited out.
        answers: list[JobResult] = []
        wait_for(lambda: _collect(answers, _serves(client, "after")), SERVING_AGAIN_TIMEOUT_S,
                 "an answer through the promoted replica")  # fmt: skip
    assert (answers[0].output, answers[0].worker_id) == ("echo: after", "acl-w1")
    assert coordinator.popen.poll() is None and worker.popen.poll() is None

    # The promoted server holds the same users: the default one is off, the worker's is limited.
    key_id = client_key.split("_")[1]
    anonymous = SyncRedis(port=promoted.port, socket_timeout=2, retry=NO_RETRY)
    as_worker = SyncRedis(port=promoted.port, username=WORKER[0], password=WORKER[1], socket_timeout=2)
    as_coordinator = SyncRedis(port=promoted.port, username=COORDINATOR[0], password=COORDINATOR[1], socket_timeout=2)
    try:
        with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
            anonymous.get(f"apikey:{key_id}")
        assert as_worker.ping()
        with pytest.raises(NoPermissionError):
            as_worker.keys("apikey:*")
        with pytest.raises(NoPermissionError):
            as_worker.hgetall(f"apikey:{key_id}")
        assert as_coordinator.exists(f"apikey:{key_id}") == 1  # replicated as data before the kill
    finally:
        for redis in (anonymous, as_worker, as_coordinator):
            redis.close()

    for proc in (worker, coordinator):
        proc.stop()
        # A duty refused by the users (the reaper, the telemetry flush, a take) would say NOPERM.
        assert "NOPERM" not in proc.log and "no permissions" not in proc.log.lower(), proc.log
        assert "Traceback" not in proc.log, proc.log
        assert [secret for secret in SECRETS if secret in proc.log] == [], "a password reached a log"


def _serves(client: APIClient, prompt: str) -> JobResult | None:
    """One request's result, or None while the pool cannot serve it (503, no answer in time)."""
    try:
        return client.infer("fake", prompt, options={"max_tokens": 4}, timeout_s=5)
    except (ServiceUnavailable, ResultTimeout):
        return None


def _collect(into: list[JobResult], answer: JobResult | None) -> bool:
    if answer is not None:
        into.append(answer)
    return answer is not None
