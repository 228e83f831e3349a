"""The fault-suite harness: a pool of real processes on a private Redis, faults, and the verdict.

A scenario is one test that

1. gets a `Pool` (fixture `pool`, or `pool_factory` for options such as an append-only Redis):
   its own Redis-compatible server, coordinator and worker processes, and a subscriber that
   counts every id announced on `results:ready`;
2. submits jobs (`pool.submit`, or a `Load` thread for "under load") and injects faults
   (`pool.kill`, `pool.pause`/`pool.resume`, `pool.redis.halt()`/`start()`, `pool.kill_coordinator`);
3. calls `pool.settle()`, records the `Outcome` as a row (`record(outcome.row(...))`), then asserts.

The invariant every scenario checks (`Outcome.assert_invariant`): every job that got a 202 ends
completed or failed with a reason code, none is lost (no result after the settle timeout), and
none has two results (announced twice, or stored twice by the workers' own account).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.exceptions import RedisError

from gputorrent import keys, queue, redis_client
from gputorrent.embedded import EmbeddedRedis, free_port
from gputorrent.protocol import JobResult, JobStatus
from tests.conftest import PROCESS_START_TIMEOUT_S, Process, alive_workers, wait_for

# Short liveness settings so a scenario sees a death in seconds; the coordinator hands them to workers.
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 3.0
# The target for recovery: the heartbeat expires, a reaper round (an interval) moves the job, a free slot takes it.
RECOVERY_TARGET_S = HEARTBEAT_TIMEOUT_S + 1.0
SETTLE_TIMEOUT_S = 45.0
QUIET_TIMEOUT_S = 2 * HEARTBEAT_TIMEOUT_S + 2
POLL_S = 0.05
# The results subscriber pings after this much quiet, and reconnects after SUBSCRIBER_SILENCE_S without a word.
SUBSCRIBER_PING_S = 0.5
SUBSCRIBER_SILENCE_S = 2.0
REPORT_ENV = "GPUTORRENT_FAULT_REPORT"

_STARTED = re.compile(r"request ([0-9a-f]+) started")
_STORED = re.compile(r"request ([0-9a-f]+) (?:completed|failed|cancelled) in ")


def expected_output(prompt: str, max_tokens: int) -> str:
    """What the fake backend answers: `echo:` then the prompt's words, one token each."""
    return " ".join(["echo:", *prompt.split()][:max_tokens])


@dataclass(frozen=True)
class Submitted:
    """A job that got its 202."""

    request_id: str
    coordinator: str  # the URL that accepted it
    worker_id: str  # the worker it was first queued on
    prompt: str
    max_tokens: int
    at: float  # time.time() at the 202


@dataclass
class Row:
    """One line of the fault table."""

    scenario: str
    submitted: int
    completed: int
    failed: dict[str, int]
    lost: int
    duplicated: int
    recover_s: float | None  # None: the scenario hands nothing on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    """Where every submitted job ended, read after the dust settled."""

    submitted: list[Submitted]
    results: dict[str, JobResult]
    lost: dict[str, str]  # request id -> where it was found in Redis instead, for the failure message
    duplicated: dict[str, int]  # request id -> how many results it had
    wrong_output: list[str] = field(default_factory=list)
    # Entries still in a queue or processing list once idle: a lease nobody will finish, which a
    # restart of its worker would run (and store) a second time.
    stray: dict[str, list[str]] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results.values() if r.status == "completed")

    @property
    def failed(self) -> dict[str, int]:
        codes = Counter(
            r.error.code if r.error else "no_code" for r in self.results.values() if r.status != "completed"
        )
        return dict(sorted(codes.items()))

    def row(self, scenario: str, recover_s: float | None) -> Row:
        return Row(
            scenario=scenario,
            submitted=len(self.submitted),
            completed=self.completed,
            failed=self.failed,
            lost=len(self.lost),
            duplicated=len(self.duplicated),
            recover_s=None if recover_s is None else round(recover_s, 2),
        )

    def assert_invariant(self, allowed_failures: Iterable[str] = ()) -> None:
        """Nothing lost, nothing twice, right answers, nothing left in a list, and only the listed
        failure codes."""
        assert not self.lost, f"{len(self.lost)} accepted jobs have no result: {self.lost}"
        assert not self.duplicated, f"jobs with more than one result: {self.duplicated}"
        assert not self.wrong_output, f"results whose output is not their prompt's: {self.wrong_output}"
        accepted = {job.request_id for job in self.submitted}
        stray = {
            key: [f"{rid} ({'accepted' if rid in accepted else 'never got its 202'})" for rid in ids]
            for key, ids in self.stray.items()
        }
        assert not stray, f"entries left in queue or processing lists of idle workers after settling: {stray}"
        unexpected = {code: n for code, n in self.failed.items() if code not in set(allowed_failures)}
        assert not unexpected, f"unexpected failures: {unexpected}"
        assert self.completed + sum(self.failed.values()) == len(self.submitted)


class Announcements(threading.Thread):
    """Counts each request id announced on `results:ready`, resubscribing after a Redis restart.

    A result is announced in the same script that stores it, so an id announced twice had two
    results written. (An announcement published while this subscriber reconnects is missed;
    that can only hide a duplicate, which is why workers' logs are counted as well.)
    """

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="announcements", daemon=True)
        self._redis_url = redis_url
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._first_at: dict[str, float] = {}
        self._stopping = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            client = redis_client.sync_client(self._redis_url, socket_connect_timeout=1, socket_timeout=5)
            try:
                if keys.sharded_channels():  # a cluster: each cell's shard channel, on its primary
                    self._hear_shards(client)
                    continue
                with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(keys.RESULTS_CHANNEL)
                    self.subscribed.set()
                    heard_at = pinged_at = time.monotonic()
                    while not self._stopping.is_set():
                        message = pubsub.get_message(timeout=0.1)
                        now = time.monotonic()
                        if message is not None:
                            heard_at = now
                            if message["type"] == "message":
                                self._note(queue.read_announcement(message["data"].decode())[0])
                        # A link cut silently (tests/netns.py) raises nothing on a subscriber: ping it
                        # when quiet, and take a connection that answers nothing for a while as dead.
                        elif now - heard_at > SUBSCRIBER_SILENCE_S:
                            raise ConnectionError("the results subscriber's connection went silent")
                        elif now - pinged_at > SUBSCRIBER_PING_S and now - heard_at > SUBSCRIBER_PING_S:
                            pubsub.ping()
                            pinged_at = now
            except (RedisError, OSError):  # ConnectionError (the built-in one) is an OSError
                self.subscribed.clear()
                self._stopping.wait(0.02)  # Redis is restarting: try again soon, it is back within seconds
            finally:
                client.close()

    def _hear_shards(self, client: Any) -> None:
        """On a Redis Cluster: every cell's results channel, read by redis-py's cluster pub/sub, which
        polls each primary in turn and follows a channel whose slot moved. A link cut silently raises
        nothing there and its pings go to one node: a subscription quiet for `SUBSCRIBER_SILENCE_S` is
        made anew, with a new client that reads the slot map again."""
        with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.ssubscribe(*keys.results_channels())
            self.subscribed.set()
            heard_at = time.monotonic()
            while not self._stopping.is_set() and time.monotonic() - heard_at < SUBSCRIBER_SILENCE_S:
                message = pubsub.get_sharded_message(timeout=0.1)
                if message is not None and message["type"] == "smessage":
                    heard_at = time.monotonic()
                    self._note(queue.read_announcement(message["data"].decode())[0])

    def _note(self, request_id: str) -> None:
        with self._lock:
            self._counts[request_id] += 1
            self._first_at.setdefault(request_id, time.time())

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def first_at(self) -> dict[str, float]:
        with self._lock:
            return dict(self._first_at)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)


class RecoveryWatch(threading.Thread):
    """Measures, for jobs hit by a fault, how long until each runs again (or has its result).

    "Runs again" is read from Redis: `job:{id}` says running with a `started_at` later than the
    fault (a start by another worker, or by the same id restarted), or `result:{id}` exists.
    """

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="recovery-watch", daemon=True)
        self._client = redis_client.sync_client(
            redis_url, decode_responses=True, socket_connect_timeout=1, socket_timeout=5
        )
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # request id -> fault time
        self.durations: dict[str, float] = {}
        self._stopping = threading.Event()

    def add(self, request_ids: Iterable[str], since: float) -> None:
        with self._lock:
            for request_id in request_ids:
                self._pending[request_id] = since

    def run(self) -> None:
        try:
            while not self._stopping.wait(POLL_S):
                with contextlib.suppress(RedisError, OSError):  # Redis restarting: look again next round
                    self._poll()
        finally:
            self._client.close()

    def _poll(self) -> None:
        with self._lock:
            pending = list(self._pending.items())
        if not pending:
            return
        now = time.time()
        with self._client.pipeline(transaction=False) as pipe:
            for request_id, _ in pending:
                pipe.hmget(keys.job_key(request_id), "status", "started_at")
                pipe.exists(keys.result_key(request_id))
            replies = pipe.execute()
        for i, (request_id, since) in enumerate(pending):
            (status, started_at), has_result = replies[2 * i], replies[2 * i + 1]
            if status == "running" and started_at is not None and float(started_at) > since:
                recovered_at = float(started_at)
            elif has_result:
                recovered_at = now
            else:
                continue
            with self._lock:
                self._pending.pop(request_id, None)
                self.durations[request_id] = recovered_at - since

    def done(self) -> bool:
        with self._lock:
            return not self._pending

    def wait(self, timeout_s: float) -> None:
        wait_for(self.done, timeout_s, "the jobs hit by the fault to run again")

    def worst(self) -> float | None:
        with self._lock:
            return max(self.durations.values(), default=None)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)


@dataclass
class WorkerSpec:
    worker_id: str
    coordinator: str
    slots: int
    env: dict[str, str]
    redis_url: str


class Pool:
    """Coordinators and workers as processes on one private Redis, with the means to hurt them."""

    def __init__(
        self, tmp_path: Path, redis: EmbeddedRedis, max_attempts: int = 3, headers: dict[str, str] | None = None
    ) -> None:
        self.tmp_path = tmp_path
        self.headers = headers or {}  # sent with every request the harness makes (an API key, say)
        self.redis = redis
        self.redis_url = redis.url
        self.max_attempts = max_attempts
        self.coordinators: dict[str, tuple[str, Process]] = {}  # name -> (url, process)
        self.specs: dict[str, WorkerSpec] = {}
        self.workers: dict[str, Process] = {}  # the current process of each worker id
        self.all_processes: list[Process] = []  # every incarnation, for logs and teardown
        self.worker_processes: list[Process] = []  # every worker incarnation, for their logs
        self.submitted: list[Submitted] = []
        self._lock = threading.Lock()
        self._serial = 0
        self.client = redis_client.sync_client(self.redis_url, decode_responses=True, socket_timeout=5)
        self.http = httpx.Client(timeout=10, headers=self.headers)
        self.announcements = Announcements(self.redis_url)
        self.announcements.start()
        self.recovery = RecoveryWatch(self.redis_url)
        self.recovery.start()
        wait_for(self.announcements.subscribed.is_set, 10, "the results subscriber")

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> Process:
        proc = Process(args, self.tmp_path / f"{name}-{len(self.all_processes)}.log", env)
        self.all_processes.append(proc)
        return proc

    def coordinator(self, name: str = "c1", env: dict[str, str] | None = None) -> str:
        """Start a coordinator process (with `env` added to its settings) and return its URL once /health answers."""
        port = free_port()
        env = {**self.coordinator_env(), **(env or {})}
        proc = self._spawn(["coordinator", "--port", str(port), "--redis-url", self.redis_url], name, env)
        url = f"http://127.0.0.1:{port}"
        self.coordinators[name] = (url, proc)
        wait_for(
            lambda: self._healthy(url) or proc.popen.poll() is not None, PROCESS_START_TIMEOUT_S, f"{name} /health"
        )
        assert proc.popen.poll() is None, proc.log
        return url

    def coordinator_env(self) -> dict[str, str]:
        """The settings every scenario's coordinator runs with."""
        return {
            "GPUTORRENT_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
            "GPUTORRENT_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "GPUTORRENT_MAX_ATTEMPTS": str(self.max_attempts),
            "GPUTORRENT_AUTH": "off",  # loopback only; the suite is about faults, tests/*/test_auth.py about keys
            # Scenarios place jobs on chosen workers; the policies' own reliability is tested in
            # tests/integration/test_routing_policies.py.
            "GPUTORRENT_ROUTING": "round_robin",
        }

    def url(self, name: str = "c1") -> str:
        return self.coordinators[name][0]

    def _healthy(self, url: str) -> bool:
        try:
            return self.http.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def health(self, name: str = "c1") -> int | None:
        """The coordinator's /health status code, None when it does not answer."""
        try:
            return self.http.get(f"{self.url(name)}/health", timeout=5).status_code
        except httpx.TransportError:
            return None

    def kill_coordinator(self, name: str) -> float:
        _, proc = self.coordinators[name]
        at = time.time()
        proc.signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)
        return at

    def start_workers(
        self,
        *worker_ids: str,
        token_delay_s: float = 0.0,
        slots: int = 1,
        coordinator: str = "c1",
        env: dict[str, str] | None = None,
        redis_url: str | None = None,
    ) -> None:
        """Start worker processes on the fake backend and wait until the coordinator lists them alive.

        `redis_url` points them elsewhere than the pool's Redis (through a `RedisProxy`, say).
        """
        for worker_id in worker_ids:
            self.specs[worker_id] = WorkerSpec(
                worker_id=worker_id,
                coordinator=self.url(coordinator),
                slots=slots,
                redis_url=redis_url or self.redis_url,
                env={
                    "GPUTORRENT_FAKE_TOKEN_DELAY_S": str(token_delay_s),
                    "GPUTORRENT_MAX_ATTEMPTS": str(self.max_attempts),
                    **(env or {}),
                },
            )
            self._launch(worker_id)
        for worker_id in worker_ids:
            self.wait_alive(worker_id)

    def _launch(self, worker_id: str) -> Process:
        spec = self.specs[worker_id]
        args = [
            "worker", "--backend", "fake", "--coordinator", spec.coordinator, "--redis-url", spec.redis_url,
            "--worker-id", worker_id, "--slots", str(spec.slots),
        ]  # fmt: skip
        proc = self._spawn(args, f"worker-{worker_id}", spec.env)
        self.workers[worker_id] = proc
        self.worker_processes.append(proc)
        return proc

    def wait_alive(self, worker_id: str) -> None:
        proc = self.workers[worker_id]
        url = self.specs[worker_id].coordinator
        wait_for(
            lambda: proc.popen.poll() is not None or worker_id in alive_workers(url),
            PROCESS_START_TIMEOUT_S,
            f"worker {worker_id} alive",
        )
        assert proc.popen.poll() is None, proc.log

    def restart(self, worker_id: str, *, wait: bool = True) -> Process:
        """Start the worker again under the same id (as a supervisor would): it takes its queue back."""
        assert self.workers[worker_id].popen.poll() is not None, f"{worker_id} is still running"
        proc = self._launch(worker_id)
        if wait:
            self.wait_alive(worker_id)
        return proc

    def kill(self, worker_id: str) -> float:
        """kill -9 the worker; returns when it is gone, with the time the signal was sent."""
        proc = self.workers[worker_id]
        at = time.time()
        proc.signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)
        return at

    def pause(self, worker_id: str) -> float:
        at = time.time()
        self.workers[worker_id].signal(signal.SIGSTOP)
        return at

    def resume(self, worker_id: str) -> None:
        self.workers[worker_id].signal(signal.SIGCONT)

    def is_alive(self, worker_id: str) -> bool:
        """The coordinator's view: the worker's heartbeat key exists."""
        return bool(self.client.exists(keys.heartbeat_key(worker_id)))

    # -- jobs -----------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | None = None,
        *,
        coordinator: str = "c1",
        max_tokens: int = 64,
        http: httpx.Client | None = None,
    ) -> Submitted | None:
        """POST /inference; the job when it got a 202, None when it was refused or unanswered."""
        with self._lock:
            self._serial += 1
            serial = self._serial
        prompt = prompt if prompt is not None else f"job {serial}"
        url = self.url(coordinator)
        body = {"model": "fake", "prompt": prompt, "options": {"max_tokens": max_tokens}}
        try:
            response = (http or self.http).post(f"{url}/inference", json=body)
        except httpx.TransportError:
            return None
        if response.status_code != 202:
            return None
        accepted = response.json()
        job = Submitted(accepted["request_id"], url, accepted["worker_id"], prompt, max_tokens, time.time())
        with self._lock:
            self.submitted.append(job)
        return job

    def track(self, job: Submitted) -> None:
        """Count a job a scenario submitted itself (a streamed one, say) like those `submit` made."""
        with self._lock:
            self.submitted.append(job)

    def jobs(self) -> list[Submitted]:
        with self._lock:
            return list(self.submitted)

    def first_results_after(self, outcome: Outcome, since: float) -> dict[str, float]:
        """Each worker's first result announced after `since` (unix time): when it stored results again."""
        announced_at = self.announcements.first_at()
        first: dict[str, float] = {}
        for job in self.jobs():
            result, at = outcome.results.get(job.request_id), announced_at.get(job.request_id)
            if result is not None and at is not None and at > since:
                first[result.worker_id] = min(at, first.get(result.worker_id, at))
        return first

    def held_by(self, worker_id: str) -> list[str]:
        """The request ids in the worker's processing list (the jobs it had started)."""
        return list(self.client.lrange(keys.processing_key(worker_id), 0, -1))

    def queued_on(self, worker_id: str) -> list[str]:
        return list(self.client.lrange(keys.queue_key(worker_id), 0, -1))

    def status(self, request_id: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.client.hgetall(keys.job_key(request_id)).items()}

    def results_stored(self, request_ids: Iterable[str]) -> int:
        with self.client.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.exists(keys.result_key(request_id))
            return sum(pipe.execute())

    def _unfinished(self) -> list[str]:
        ids = [job.request_id for job in self.jobs()]
        with self.client.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.exists(keys.result_key(request_id))
            return [request_id for request_id, found in zip(ids, pipe.execute(), strict=True) if not found]

    def _quiet(self) -> bool:
        """No job queued or held anywhere, and no live worker still busy (a paused one finishing late)."""
        for worker_id in self.specs:
            if self.client.llen(keys.queue_key(worker_id)) or self.client.llen(keys.processing_key(worker_id)):
                return False
            beat = self.client.get(keys.heartbeat_key(worker_id))
            if beat is not None and json.loads(beat).get("jobs_in_flight", 0) and self._running(worker_id):
                return False
        return True

    def _running(self, worker_id: str) -> bool:
        proc = self.workers.get(worker_id)
        return proc is not None and proc.popen.poll() is None

    def settle(self, via: str = "c1", timeout_s: float = SETTLE_TIMEOUT_S) -> Outcome:
        """Wait until every accepted job has a result and the pool is idle, then read every result
        through coordinator `via`. A job still without a result at the timeout is counted lost
        (not raised here, so the scenario can record its row before asserting)."""
        try:
            wait_for(lambda: not self._unfinished(), timeout_s, "every accepted job's result")
        except AssertionError:
            pass  # some are lost: the pool will not go idle either
        else:
            # Idle means nothing queued or held anywhere; a paused worker finishing late, or the reaper
            # moving a dead worker's jobs, gets that long. What is still listed after it is reported stray.
            with contextlib.suppress(AssertionError):
                wait_for(self._quiet, QUIET_TIMEOUT_S, "the pool to go idle")
        jobs = self.jobs()
        results: dict[str, JobResult] = {}
        lost: dict[str, str] = {}
        for job in jobs:
            response = self._get_result(via, job.request_id)
            if response.status_code == 200:
                results[job.request_id] = JobResult.model_validate_json(response.content)
            else:
                lost[job.request_id] = self._whereabouts(job.request_id, response)
        stored = self.stored_counts()
        announced = self.announcements.counts()
        duplicated = {
            job.request_id: n
            for job in jobs
            if (n := max(announced[job.request_id], stored[job.request_id])) > 1
        }  # fmt: skip
        wrong = [
            job.request_id
            for job in jobs
            if (r := results.get(job.request_id)) is not None
            and r.status == "completed"
            and r.output != expected_output(job.prompt, job.max_tokens)
        ]
        stray = {
            key: [str(request_id) for request_id in entries]
            for worker_id in self.specs
            for key in (keys.queue_key(worker_id), keys.processing_key(worker_id))
            if (entries := self.client.lrange(key, 0, -1))
        }
        return Outcome(
            submitted=jobs, results=results, lost=lost, duplicated=duplicated, wrong_output=wrong, stray=stray
        )

    def _get_result(self, via: str, request_id: str) -> httpx.Response:
        """GET /result as a client should: a 503 (Redis unavailable: retry shortly) is retried."""
        deadline = time.monotonic() + 10
        while True:
            response = self.http.get(f"{self.url(via)}/result/{request_id}")
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
            threading.Event().wait(0.1)  # pacing the retries (Retry-After says 1 s; the test is in a hurry)

    def _whereabouts(self, request_id: str, response: httpx.Response) -> str:
        """Where a lost job is, for the failure message: its status and any list that holds it."""
        found = [
            key
            for key in self.client.scan_iter(match="*:*", count=1000)
            if self.client.type(key) == "list" and request_id in self.client.lrange(key, 0, -1)
        ]
        status = JobStatus.model_validate_json(response.content) if response.status_code == 202 else None
        return f"HTTP {response.status_code}, status {status}, in {found or 'no list'}"

    # -- logs -----------------------------------------------------------------------------------

    def _worker_logs(self) -> list[str]:
        return [p.log for p in self.worker_processes]

    def started_counts(self) -> Counter[str]:
        """How many times each request id was started, by every worker incarnation's own log."""
        return Counter(m for log in self._worker_logs() for m in _STARTED.findall(log))

    def stored_counts(self) -> Counter[str]:
        """How many times each request id's result was stored by a worker, by the workers' logs."""
        return Counter(m for log in self._worker_logs() for m in _STORED.findall(log))

    def log_of(self, worker_id: str) -> str:
        return self.workers[worker_id].log

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        # Paused workers cannot handle SIGTERM: resume first. Workers go first (they mark themselves
        # gone), all signalled at once so their stops overlap, then the coordinators.
        running = [p for p in self.all_processes if p.popen.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.signal(signal.SIGCONT)
                proc.signal(signal.SIGTERM)
        for proc in self.all_processes:
            proc.stop()
        self.announcements.stop()
        self.recovery.stop()
        self.http.close()
        self.client.close()


class Load(threading.Thread):
    """Submits jobs at a steady rate, round-robin over coordinators, until `count` or `stop()`.

    Refusals (503 while Redis is down, a dead coordinator) are counted and not retried: only a
    202 makes a job the system's responsibility.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        rate_per_s: float,
        count: int | None = None,
        coordinators: list[str] | None = None,
        max_tokens: int = 64,
        prompt: Callable[[int], str] = lambda n: f"load {n} a b c",
    ) -> None:
        super().__init__(name="load", daemon=True)
        self.pool = pool
        self.interval_s = 1.0 / rate_per_s
        self.count = count
        self.coordinators = coordinators or ["c1"]
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.refused: Counter[str] = Counter()
        self.sent = 0
        self._stopping = threading.Event()

    def use(self, coordinators: list[str]) -> None:
        """From now on submit only through these coordinators (the others were killed)."""
        self.coordinators = coordinators

    def run(self) -> None:
        with httpx.Client(timeout=10, headers=self.pool.headers) as http:
            next_at = time.monotonic()
            while not self._stopping.is_set() and (self.count is None or self.sent < self.count):
                names = self.coordinators
                name = names[self.sent % len(names)]
                if (
                    self.pool.submit(self.prompt(self.sent), coordinator=name, max_tokens=self.max_tokens, http=http)
                    is None
                ):
                    self.refused[name] += 1
                self.sent += 1
                next_at += self.interval_s
                # Pacing, not synchronisation: the next submission is due at `next_at`.
                self._stopping.wait(max(0.0, next_at - time.monotonic()))

    def accepted_by(self, coordinator_url: str) -> list[Submitted]:
        return [job for job in self.pool.jobs() if job.coordinator == coordinator_url]

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=30)


class Supervisor(threading.Thread):
    """Restarts every worker that exits, under the same id, as systemd or Kubernetes would."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.pool = pool
        self.exits: list[tuple[str, int]] = []  # (worker id, exit code) per death seen
        self.exit_times: list[float] = []
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def first_exit_at(self) -> float:
        return self.exit_times[0]

    def run(self) -> None:
        try:
            while not self._stopping.wait(POLL_S):
                for worker_id, proc in list(self.pool.workers.items()):
                    code = proc.popen.poll()
                    if code is not None:
                        self.exit_times.append(time.time())
                        self.exits.append((worker_id, code))
                        self.pool.restart(worker_id, wait=False)
        except BaseException as e:  # surfaced by stop(), in the test's thread
            self.error = e

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)
        if self.error is not None:
            raise self.error


def write_report_row(row: Row, path: str | None = None) -> None:
    """Merge `row` by scenario name into the JSON file `$GPUTORRENT_FAULT_REPORT` names, if any."""
    target = path or os.environ.get(REPORT_ENV)
    if not target:
        return
    report = Path(target)
    rows: dict[str, Any] = json.loads(report.read_text()) if report.exists() and report.stat().st_size else {}
    rows[row.scenario] = row.to_json()
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    tmp.replace(report)


@dataclass(frozen=True)
class Kill:
    worker_id: str
    restart: str  # "at_once", or "after_reap": once the reaper has handed its jobs on
    at: float
    held: list[str]  # the jobs it had started


class Chaos:
    """kill -9 random workers as results come in, and restart them, all from a seeded `random.Random`.

    The seed fixes the choices (which worker, when in results, how it comes back), not the
    interleaving the machine's timing gives them. At least one worker is always left running.
    """

    RESTARTS = ("at_once", "after_reap")

    def __init__(self, pool: Pool, rng: random.Random, spacing: tuple[int, int]) -> None:
        self.pool = pool
        self.rng = rng
        self.spacing = spacing  # results between two kills, drawn uniformly in this range
        self.next_kill_at = rng.randint(*spacing)
        self.down: dict[str, str] = {}  # worker id -> how it will be restarted
        self.kills: list[Kill] = []

    def _registered(self, worker_id: str) -> bool:
        proc = self.pool.workers[worker_id]
        return proc.popen.poll() is None and f"worker {worker_id} registered" in proc.log

    def step(self) -> None:
        pool = self.pool
        for worker_id, restart in list(self.down.items()):
            reaped = not (pool.is_alive(worker_id) or pool.held_by(worker_id) or pool.queued_on(worker_id))
            if restart == "at_once" or reaped:
                pool.restart(worker_id, wait=False)
                del self.down[worker_id]
        results = len(pool.announcements.counts())
        up = sorted(w for w in pool.specs if w not in self.down and self._registered(w))
        if results >= self.next_kill_at and len(up) >= 2:
            victim = self.rng.choice(up)
            restart = self.rng.choice(self.RESTARTS)
            at = pool.kill(victim)
            held = pool.held_by(victim)
            pool.recovery.add(held, since=at)
            self.kills.append(Kill(victim, restart, at, held))
            self.down[victim] = restart
            self.next_kill_at = results + self.rng.randint(*self.spacing)

    def run_until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Step every POLL_S until `done()` or `timeout_s`; then bring every worker back."""
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            self.step()
            threading.Event().wait(POLL_S)  # polling a condition, not waiting out a race
        for worker_id in list(self.down):
            self.pool.restart(worker_id, wait=False)
            del self.down[worker_id]
        for worker_id in self.pool.specs:
            self.pool.wait_alive(worker_id)


class RedisProxy(threading.Thread):
    """A TCP proxy in front of Redis that can withhold the server's replies, cut every connection,
    and turn new connections away.

    It stands for a network that fails at the worst moment: a command reaches Redis and runs,
    and the connection dies before its reply comes back; or a way to Redis that stays down a
    while after the server is back.
    """

    def __init__(self, upstream_port: int) -> None:
        super().__init__(name="redis-proxy", daemon=True)
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.withholding = threading.Event()
        # When set, the first reply that contains these bytes starts the withholding (it is withheld too).
        self.withhold_from: bytes | None = None
        # While set, each new connection is closed at once, as if the server were not there.
        self.refusing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # the connections open now
        self._opened: list[socket.socket] = []  # every socket ever opened, closed by close()
        self._pumps: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def run(self) -> None:
        with contextlib.suppress(OSError):  # the listener is closed by close()
            while True:
                client, _ = self._listener.accept()
                try:
                    if self.refusing.is_set():
                        raise ConnectionRefusedError
                    upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
                except OSError:  # turned away, or the server is down: the client's connection closes
                    client.close()
                    continue
                with self._lock:
                    self._sockets += [client, upstream]
                    self._opened += [client, upstream]
                    for source, sink, replies in ((client, upstream, False), (upstream, client, True)):
                        pump = threading.Thread(target=self._pump, args=(source, sink, replies), daemon=True)
                        self._pumps.append(pump)
                        pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if replies and self.withhold_from is not None and self.withhold_from in data:
                    self.withholding.set()
                if not (replies and self.withholding.is_set()):
                    sink.sendall(data)
        for sock in (source, sink):  # one side closed: close the other, as a dropped connection would
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection (what was withheld is never delivered) and pass replies again."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.withholding.clear()
        self.withhold_from = None

    def close(self) -> None:
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.join(timeout=5)
        with self._lock:
            pumps = list(self._pumps)
        for pump in pumps:
            pump.join(timeout=5)
        for sock in self._opened:
            sock.close()
