"""Scenario 10: kill -9 of the Redis primary under load; Sentinel promotes the replica.

A primary, one replica and three Sentinels (tests/sentinel.py; failure seen after 1 s). The
coordinator and the workers are given only the Sentinel URL and are not restarted: each finds the
new primary by itself. While there is none, requests get 503 with `Retry-After` (never a 500, never
an answer slower than the connection timeouts allow); workers keep the results they finish and
store them once the new primary answers. Every job that got a 202 ends with exactly one result.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.faults.harness import Load, Pool, Row
from tests.sentinel import SentinelDeployment

pytestmark = pytest.mark.fault

SCENARIO = "10. Redis primary kill -9 under load, Sentinel failover"
WORKERS = ("w1", "w2")
# The coordinator connects within 2 s and the Sentinels are asked within as long each: no answer
# may take longer than that, with room for a loaded 2-core machine.
SLOWEST_ANSWER_S = 8.0


@dataclass(frozen=True)
class Probe:
    at: float
    status: int | None  # None: no HTTP answer at all
    retry_after: str | None
    took_s: float


class Prober(threading.Thread):
    """Asks `GET /workers` (a read of Redis) every 50 ms and keeps every answer."""

    def __init__(self, url: str) -> None:
        super().__init__(name="prober", daemon=True)
        self._url = url
        self._stopping = threading.Event()
        self.probes: list[Probe] = []

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stopping.wait(0.05):  # pacing the probes, not synchronisation
                start = time.time()
                try:
                    response = http.get(f"{self._url}/workers")
                    status, retry_after = response.status_code, response.headers.get("retry-after")
                except httpx.TransportError:
                    status = retry_after = None
                self.probes.append(Probe(start, status, retry_after, time.time() - start))

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=40)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    with SentinelDeployment(tmp_path / "redis") as started:
        yield started


def test_no_accepted_job_is_lost_when_sentinel_fails_the_primary_over_under_load(
    deployment: SentinelDeployment, tmp_path: Path, record: Callable[[Row], None]
) -> None:
    pool = Pool(tmp_path, deployment)  # type: ignore[arg-type]  # only `.url` is read: the Sentinel URL
    prober: Prober | None = None
    try:
        pool.coordinator("c1")
        pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
        load = Load(pool, rate_per_s=20, max_tokens=6)
        prober = Prober(pool.url("c1"))
        load.start()
        prober.start()
        try:
            wait_for(lambda: len(pool.announcements.counts()) >= 20, 30, "20 results before the kill")
            old_port, killed_at = deployment.kill_primary()
            deployment.wait_for_failover(old_port)
            promoted_at = time.time()
            wait_for(lambda: any(j.at > promoted_at for j in pool.jobs()), 30, "a job accepted after the failover")
            wait_for(lambda: sum(j.at > promoted_at for j in pool.jobs()) >= 40, 30, "40 jobs after the failover")
        finally:
            load.stop()
            prober.stop()
        outcome = pool.settle()
        first_by_worker = pool.first_results_after(outcome, killed_at)
        # Recovered when every worker stores results again on the new primary.
        recover_s = max(first_by_worker.values()) - killed_at if len(first_by_worker) == len(WORKERS) else None
        record(outcome.row(SCENARIO, recover_s))
        print(
            f"\nfailover: promoted {promoted_at - killed_at:.2f} s after the kill; first 202 after it "
            f"{min(j.at for j in pool.jobs() if j.at > killed_at) - killed_at:.2f} s; every worker storing "
            f"again {recover_s} s; refused {dict(load.refused)}"
        )

        outcome.assert_invariant()
        assert set(first_by_worker) == set(WORKERS), f"workers that stored results after the kill: {first_by_worker}"
        assert all(pool.workers[w].popen.poll() is None for w in WORKERS)  # nobody restarted or died
        probes = prober.probes
        assert [p for p in probes if p.status is None or (p.status >= 500 and p.status != 503)] == []
        outage = [p for p in probes if p.status == 503]
        assert outage, "no request saw the primary gone: the failover was not under way while probing"
        assert all(p.retry_after == "1" for p in outage), outage
        assert max(p.took_s for p in probes) < SLOWEST_ANSWER_S, max(probes, key=lambda p: p.took_s)
        assert probes[-1].status == 200
    finally:
        if prober is not None and prober.is_alive():
            prober.stop()
        pool.close()


SCENARIO_BURST = "10b. Redis primary kill -9 right after a burst of 202s (WAIT for the replica)"
BURST = 30


def test_a_burst_acknowledged_just_before_the_primary_dies_is_not_lost(
    deployment: SentinelDeployment, tmp_path: Path, record: Callable[[Row], None]
) -> None:
    """The burst's 202s wait for the replica (stopped while they are sent, so none can come before it has
    the jobs), and the primary is killed the moment the last one arrives: the promoted replica has every
    job, and each runs once."""
    pool = Pool(tmp_path, deployment)  # type: ignore[arg-type]  # only `.url` is read: the Sentinel URL
    try:
        pool.coordinator("c1", env={"GPUTORRENT_WAIT_TIMEOUT_MS": "20000"})
        pool.start_workers(*WORKERS, token_delay_s=0.1, slots=1)
        primary_port = deployment.primary_port()
        replica = next(s for s in deployment.servers if s.port != primary_port and s.running())
        clients = [httpx.Client(timeout=30) for _ in range(BURST)]
        with concurrent.futures.ThreadPoolExecutor(BURST) as threads:
            replica.process.send_signal(signal.SIGSTOP)
            try:
                burst = [threads.submit(pool.submit, f"burst {i}", max_tokens=6, http=c) for i, c in enumerate(clients)]
                done, _ = concurrent.futures.wait(burst, timeout=0.5)
                assert not done, "202s came while the only replica could not have the jobs"
            finally:
                replica.process.send_signal(signal.SIGCONT)
            concurrent.futures.wait(burst, timeout=30)
            old_port, killed_at = deployment.kill_primary()
        for client in clients:
            client.close()
        accepted = [future.result() for future in burst]
        assert all(job is not None for job in accepted), "a submission of the burst was refused"
        unfinished_at_kill = BURST - len(pool.announcements.counts())
        deployment.wait_for_failover(old_port)
        outcome = pool.settle()
        record(outcome.row(SCENARIO_BURST, None))
        print(f"\nburst: {BURST} accepted, {unfinished_at_kill} without a result at the kill {killed_at:.2f}")
        outcome.assert_invariant()
        assert unfinished_at_kill > BURST // 2, "the jobs ran before the kill: the scenario tested nothing"
    finally:
        pool.close()


SCENARIO_SWITCH = "10c. a planned switch of the Redis primary (SENTINEL FAILOVER) under load"


def test_no_accepted_job_is_lost_when_the_primary_is_switched_over_on_purpose_under_load(
    deployment: SentinelDeployment, tmp_path: Path, record: Callable[[Row], None]
) -> None:
    """`SENTINEL FAILOVER`, as an operator patching the Redis host runs it: the old primary lives on and
    answers while the Sentinels promote its replica and, some 10 s later, make it a replica of the new one.
    What it takes in between has no replica: none of it is acknowledged (a short `WAIT`, the Sentinels
    asked when its replica left), and every process leaves it when the Sentinels announce the switch."""
    pool = Pool(tmp_path, deployment)  # type: ignore[arg-type]  # only `.url` is read: the Sentinel URL
    try:
        pool.coordinator("c1")
        pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
        load = Load(pool, rate_per_s=20, max_tokens=6)
        load.start()
        try:
            wait_for(lambda: len(pool.announcements.counts()) >= 20, 30, "20 results before the switch")
            old = deployment.primary()
            switched_at = time.time()
            assert deployment.sentinels[0].ask("SENTINEL", "FAILOVER", "pool") == "OK"
            deployment.wait_for_promotion(old)
            deployment.wait_for_replica_of(old, deployment.primary(), 30)
            demoted_at = time.time()
            wait_for(lambda: sum(j.at > demoted_at for j in pool.jobs()) >= 40, 30, "40 jobs after the switch")
        finally:
            load.stop()
        outcome = pool.settle()
        record(outcome.row(SCENARIO_SWITCH, None))
        print(
            f"\nswitch: old primary a replica {demoted_at - switched_at:.2f} s after SENTINEL FAILOVER; "
            f"refused {dict(load.refused)}"
        )
        outcome.assert_invariant()
        heard = "the Sentinels failed the Redis primary over to"
        deaf = [p.log_path.name for p in pool.all_processes if heard not in p.log]
        assert not deaf, f"processes that did not hear the switch: {deaf}"
    finally:
        pool.close()
