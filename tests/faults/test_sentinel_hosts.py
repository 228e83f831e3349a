"""Scenarios L5 and L6: Redis with Sentinel on separate hosts; the primary's host cut off, and a soak.

The Sentinel layout of docs/operations.md on hosts of their own (tests/faults/conftest.py,
`sentinel_host_pool`): the primary and a Sentinel on `r1`, the replica and a Sentinel on `r2`, the
third Sentinel on `r3`; coordinator `c1`, workers `w1` and `w2` and the client each on a host of its
own, all given only the `redis+sentinel://` URL that names the three Sentinels by address. Checked
like the rest of the suite (`Outcome.assert_invariant`: every 202 ends with exactly one result or a
failure with a reason, none lost, none twice, right outputs).

The soak (L6) runs 35 s of faults in the default run; the `slow` one runs `GPUTORRENT_NETNS_SOAK_S`
(240 by default) with `-m slow`; `GPUTORRENT_NETNS_SOAK_SEED` repeats a sequence (else a random seed,
printed). Figures and what they mean: docs/reliability.md, "Redis with Sentinel on hosts of its own".
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import wait_for
from tests.faults.harness import HEARTBEAT_TIMEOUT_S, Row
from tests.faults.netns_pool import HostLoad, HostPool
from tests.sentinel import SentinelDeployment

pytestmark = pytest.mark.fault

SentinelHostPool = Callable[..., tuple[HostPool, SentinelDeployment]]
WORKERS = ("w1", "w2")
# Sentinel reconfigures a primary that comes back as a replica only after it has been seen up for
# 4 of its 2 s publish periods (sentinel.c), then the replica makes a full sync: 8 s and a little.
REJOIN_TIMEOUT_S = 30.0
ORPHANS = 4  # jobs admitted on the cut-off side through the coordinator beside the old primary


def _unreplicated_admissions(pool: HostPool, coordinator: str) -> float:
    """`gputorrent_unreplicated_writes_total{write="admission"}` on that coordinator's /metrics."""
    text = pool.http.get(f"{pool.url(coordinator)}/metrics").text
    found = re.search(r'^gputorrent_unreplicated_writes_total\{write="admission"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _submit_on(pool: HostPool, host: str, coordinator: str, prompt: str) -> httpx.Response:
    """POST /inference from `host` to `coordinator`, not tracked by the pool: the caller judges it."""
    body = {"model": "fake", "prompt": prompt, "options": {"max_tokens": 4}}
    with pool.hosts[host].entered(), httpx.Client(timeout=10, headers=pool.headers) as http:
        return http.post(f"{pool.url(coordinator)}/inference", json=body)


def test_the_pool_goes_on_when_the_redis_primarys_host_is_cut_off_and_the_old_primary_rejoins_as_a_replica(
    sentinel_host_pool: SentinelHostPool, record: Callable[[Row], None]
) -> None:
    scenario = "L5. Redis primary's host link cut under load, Sentinel failover, old primary rejoins"
    pool, deployment = sentinel_host_pool("c1", "w1", "w2", "client")
    # A coordinator beside the primary, as `c1` on `h1` in docs/operations.md: the cut leaves it on the
    # old primary's side, where clients on that host still reach it.
    pool.coordinator("r1")
    pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
    old = deployment.primary()
    r1 = pool.hosts["r1"]
    assert old.host is not None and old.host.name == "r1"
    majority = deployment.sentinels_off(r1)
    unreplicated_before = _unreplicated_admissions(pool, "r1")
    load = HostLoad(pool, "client", rate_per_s=20, max_tokens=6)
    load.start()
    try:
        wait_for(lambda: len(pool.announcements.counts()) >= 20, 30, "20 results before the cut")
        cut_at = time.time()
        r1.cut()
        try:
            # Right away, before the workers' heartbeats lapse there (3 s), clients on r1 submit through
            # the coordinator beside the old primary, which still takes writes: its replicas are out of
            # reach, so each WAIT comes short, and none is acknowledged.
            with concurrent.futures.ThreadPoolExecutor(ORPHANS) as threads:
                orphans = list(threads.map(lambda i: _submit_on(pool, "r1", "r1", f"orphan {i}"), range(ORPHANS)))
            promoted = deployment.wait_for_promotion(old, majority)
            promoted_at = time.time()
            pool.forget_connections()  # the observer's connections hang on the old primary
            wait_for(lambda: sum(j.at > promoted_at for j in pool.jobs()) >= 40, 40, "40 jobs after the failover")
        finally:
            r1.restore()
        restored_at = time.time()
        deployment.wait_for_replica_of(old, promoted, REJOIN_TIMEOUT_S)
        rejoin_s = time.time() - restored_at
        wait_for(lambda: sum(j.at > time.time() - 1 for j in pool.jobs()) >= 10, 20, "admissions after the rejoin")
    finally:
        load.stop()

    outcome = pool.settle()
    first_by_worker = pool.first_results_after(outcome, cut_at)
    first_202_s = min(j.at for j in pool.jobs() if j.at > cut_at) - cut_at
    storing_s = max(first_by_worker.values()) - cut_at if len(first_by_worker) == len(WORKERS) else None
    record(outcome.row(scenario, storing_s))
    orphan_ids = [r.json()["error"]["request_id"] for r in orphans if r.status_code == 503]
    orphan_results = [pool.http.get(f"{pool.url('c1')}/result/{rid}").status_code for rid in orphan_ids]
    unreplicated = _unreplicated_admissions(pool, "r1") - unreplicated_before
    print(
        f"\n{scenario}: promoted {promoted_at - cut_at:.2f} s after the cut; first 202 after it {first_202_s:.2f} s; "
        f"every worker storing again {storing_s} s; old primary a replica {rejoin_s:.2f} s after the link came back; "
        f"refused {dict(load.refused)}; on the cut-off side {[r.status_code for r in orphans]}, "
        f"{unreplicated:g} counted unreplicated, after the rejoin GET /result answers {orphan_results}"
    )

    outcome.assert_invariant()
    assert set(first_by_worker) == set(WORKERS), f"workers that stored results after the cut: {first_by_worker}"
    assert all(pool.workers[w].popen.poll() is None for w in WORKERS)  # nobody restarted or died
    assert promoted.host is not None and promoted.host.name in ("r2", "r3")
    # Bounds with room (about 5 s each measured): the processes' Redis timeouts make these (2 s a reply,
    # 3 s a worker's, 2 s a Sentinel out of reach; docs/reliability.md, L5), and Sentinel's promotion.
    assert first_202_s < 15 and storing_s is not None and storing_s < 20, (first_202_s, storing_s)
    # What the old primary took while cut off came short of its replicas: each a 503 naming its request id,
    # counted, never a 202; and gone once Sentinel made it a replica of the new primary (a full sync).
    assert [r.status_code for r in orphans] == [503] * ORPHANS, [(r.status_code, r.text) for r in orphans]
    assert len(orphan_ids) == ORPHANS, [r.text for r in orphans]  # each names the id a retry would use
    assert unreplicated >= ORPHANS
    assert orphan_results == [404] * ORPHANS


# -- L6: the soak ---------------------------------------------------------------------------------

SOAK_SEED = int(os.environ.get("GPUTORRENT_NETNS_SOAK_SEED", str(random.randrange(1_000_000))))
BOUNDED_SOAK_S = 35.0
SLOW_SOAK_S = float(os.environ.get("GPUTORRENT_NETNS_SOAK_S", "240"))
FAULTS = ("short cut", "long cut", "kill -9, restart at once", "kill -9, restart after the reap", "primary cut")


@dataclass
class Soak:
    """Injects faults one after another, each drawn from a seeded `random.Random`, under steady load;
    the primary is cut off at least once (the first time at a drawn point of the first half)."""

    pool: HostPool
    deployment: SentinelDeployment
    rng: random.Random
    duration_s: float
    injected: list[tuple[float, str, str]] = field(default_factory=list)  # (time, fault, target)
    recoveries: list[float] = field(default_factory=list)  # per primary cut: from the cut to the next 202

    def run(self) -> None:
        started = time.monotonic()
        first_failover_at = started + self.rng.uniform(0.1, 0.5) * self.duration_s
        while time.monotonic() - started < self.duration_s:
            failovers = sum(1 for _, fault, _ in self.injected if fault == "primary cut")
            fault = "primary cut" if failovers == 0 and time.monotonic() >= first_failover_at else None
            if fault is None:
                fault = self.rng.choice(FAULTS if failovers else FAULTS[:-1])
            self._inject(fault)
            # Steady load between two faults: the gap is part of the drawn schedule, not a wait for anything.
            threading.Event().wait(self.rng.uniform(0.5, 3.0))
        if not any(fault == "primary cut" for _, fault, _ in self.injected):
            self._inject("primary cut")

    def _inject(self, fault: str) -> None:
        pool = self.pool
        if fault == "primary cut":
            self._cut_primary()
            return
        worker_id = self.rng.choice(WORKERS)
        host = pool.hosts[worker_id]
        self.injected.append((time.time(), fault, worker_id))
        if fault in ("short cut", "long cut"):
            # The fault itself: the link stays down a third of the heartbeat timeout, or it and 2 s more.
            cut_s = HEARTBEAT_TIMEOUT_S / 3 if fault == "short cut" else HEARTBEAT_TIMEOUT_S + 2
            at = time.time()
            held = pool.held_by(worker_id)
            host.cut()
            try:
                if fault == "long cut":
                    pool.recovery.add(held, since=at)
                threading.Event().wait(cut_s)
            finally:
                host.restore()
            wait_for(lambda: pool.is_alive(worker_id), 30, f"{worker_id} beating again after its link came back")
        else:
            at = pool.kill(worker_id)
            pool.recovery.add(pool.held_by(worker_id), since=at)
            if fault.endswith("after the reap"):
                wait_for(
                    lambda: not (pool.is_alive(worker_id) or pool.held_by(worker_id) or pool.queued_on(worker_id)),
                    30, f"{worker_id}'s jobs handed on",
                )  # fmt: skip
            pool.restart(worker_id)

    def _cut_primary(self) -> None:
        pool, deployment = self.pool, self.deployment
        old = deployment.primary()
        assert old.host is not None
        host = pool.hosts[old.host.name]
        majority = deployment.sentinels_off(host)
        at = time.time()
        self.injected.append((at, "primary cut", host.name))
        host.cut()
        try:
            deployment.wait_for_promotion(old, majority)
            pool.forget_connections()
            wait_for(lambda: any(j.at > at for j in pool.jobs()), 40, "a 202 after the primary was cut off")
            self.recoveries.append(min(j.at for j in pool.jobs() if j.at > at) - at)
        finally:
            host.restore()
        # Not necessarily `old` following the promoted one: when the link comes back the Sentinel that was
        # cut off may act on its old view first, and the Sentinels fail over again (seen in a long run).
        deployment.wait_for_agreement(2 * REJOIN_TIMEOUT_S)
        pool.forget_connections()
        for worker_id in WORKERS:
            wait_for(lambda w=worker_id: pool.is_alive(w), 30, f"{worker_id} beating after the failover")


def _soak(sentinel_host_pool: SentinelHostPool, record: Callable[[Row], None], duration_s: float, name: str) -> None:
    print(f"\nnetns soak: seed {SOAK_SEED} (GPUTORRENT_NETNS_SOAK_SEED), {duration_s:g} s")
    pool, deployment = sentinel_host_pool("c1", "w1", "w2", "client")
    pool.start_workers(*WORKERS, token_delay_s=0.02, slots=2)
    soak = Soak(pool, deployment, random.Random(SOAK_SEED), duration_s)
    load = HostLoad(pool, "client", rate_per_s=10, max_tokens=6)
    load.start()
    try:
        soak.run()
    finally:
        load.stop()
    outcome = pool.settle()
    recover_s = max([*soak.recoveries, pool.recovery.worst() or 0.0])
    record(outcome.row(name, recover_s))
    counts: dict[str, int] = {}
    for _, fault, _ in soak.injected:
        counts[fault] = counts.get(fault, 0) + 1
    print(
        f"{name}: seed {SOAK_SEED}, {len(outcome.submitted)} jobs ({dict(load.refused)} refused), completed "
        f"{outcome.completed}, failed {outcome.failed}, lost {len(outcome.lost)}, duplicated "
        f"{len(outcome.duplicated)}; faults {counts}; worst recovery {recover_s:.2f} s (primary cuts, to the next "
        f"202: {[round(r, 2) for r in soak.recoveries]}; worker faults, until their jobs ran again: "
        f"{pool.recovery.worst()})"
    )
    outcome.assert_invariant(allowed_failures=["worker_lost"])  # a job can be unlucky MAX_ATTEMPTS times
    assert counts.get("primary cut", 0) >= 1


@pytest.mark.timeout(240)
def test_a_bounded_soak_of_link_cuts_kills_and_a_failover_loses_and_duplicates_nothing(
    sentinel_host_pool: SentinelHostPool, record: Callable[[Row], None]
) -> None:
    _soak(sentinel_host_pool, record, BOUNDED_SOAK_S, "L6. soak on hosts: link cuts, kill -9, a failover (bounded)")


@pytest.mark.slow
@pytest.mark.timeout(int(SLOW_SOAK_S) + 300)
def test_a_long_soak_of_link_cuts_kills_and_failovers_loses_and_duplicates_nothing(
    sentinel_host_pool: SentinelHostPool, record: Callable[[Row], None]
) -> None:
    _soak(sentinel_host_pool, record, SLOW_SOAK_S, "L6. soak on hosts: link cuts, kill -9, failovers (long)")
