"""Scenarios L1 to L4: Redis, coordinators, workers and clients on separate hosts, links cut.

Each process runs on a host of its own (a network namespace, tests/netns.py) and reaches the
others over a veth link and a bridge; a fault is a host's link going down (`ip link set ... down`),
which drops what the host sends without an error, so connections hang instead of failing. Each
scenario is checked like the rest of the suite (`Outcome.assert_invariant`: every 202 ends with
exactly one result, none lost, none twice, right outputs) and measures its recovery.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from gputorrent import keys
from gputorrent.coordinator.app import REDIS_REPLY_TIMEOUT_S
from tests.conftest import wait_for
from tests.faults.harness import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TIMEOUT_S,
    POLL_S,
    RECOVERY_TARGET_S,
    Row,
    Submitted,
    expected_output,
)
from tests.faults.netns_pool import HostPool

pytestmark = pytest.mark.fault

HostPoolFactory = Callable[..., HostPool]
TOKEN_DELAY_S = 0.1


def _words(n: int, tag: str) -> str:
    """A prompt the fake backend answers with `n` tokens after `echo:` (one a word)."""
    return " ".join([tag, *["w"] * (n - 1)])


def test_a_worker_cut_off_past_its_heartbeat_timeout_loses_its_jobs_to_another_and_rejoins(
    host_pool: HostPoolFactory, record: Callable[[Row], None]
) -> None:
    scenario = "L1. worker host's link cut past the heartbeat timeout, jobs running"
    pool = host_pool("c1", "w1", "w2", "client")
    pool.start_workers("w1", token_delay_s=TOKEN_DELAY_S, slots=2)
    pool.start_workers("w2", token_delay_s=TOKEN_DELAY_S, slots=4)
    words = 30  # 3 s a job: w1 finishes its jobs while cut off, and offers their results when back
    jobs = [pool.submit_from("client", _words(words, f"job{i}"), max_tokens=words + 1) for i in range(4)]
    assert all(jobs)
    on_w1 = sorted(job.request_id for job in jobs if job is not None and job.worker_id == "w1")
    assert len(on_w1) == 2  # round-robin over two workers
    wait_for(lambda: sorted(pool.held_by("w1")) == on_w1, 10, "w1 running both its jobs")

    w1 = pool.hosts["w1"]
    cut_at = time.time()
    w1.cut()
    try:
        pool.recovery.add(on_w1, since=cut_at)
        pool.recovery.wait(HEARTBEAT_TIMEOUT_S + 10)  # its heartbeat lapsed, the reaper moved them, w2 runs them
        # The fault itself: the link stays down for the heartbeat timeout + 2 s, past the end of w1's jobs.
        time.sleep(max(0.0, HEARTBEAT_TIMEOUT_S + 2 - (time.time() - cut_at)))
    finally:
        w1.restore()
    restored_at = time.time()
    # Back on the network, w1 offers the results it finished meanwhile: its leases are gone, both refused.
    wait_for(lambda: pool.log_of("w1").count("result discarded") == 2, 30, "w1's two late results refused")
    wait_for(lambda: pool.is_alive("w1"), 30, "w1 beating again")
    rejoin_s = time.time() - restored_at
    wait_for(lambda: pool.listed_alive("w1"), 10, "c1 listing w1 alive again")  # so the next jobs may go to it
    later = [pool.submit_from("client", _words(3, f"later{i}"), max_tokens=4) for i in range(4)]
    assert all(later)

    outcome = pool.settle()
    failover_s = pool.recovery.worst()
    record(outcome.row(scenario, failover_s))
    print(f"{scenario}: failover {failover_s} s, w1 beating {rejoin_s:.2f} s after the link came back")

    outcome.assert_invariant()
    assert {outcome.results[rid].worker_id for rid in on_w1} == {"w2"}
    started = pool.started_counts()
    assert all(started[rid] == 2 for rid in on_w1)  # once on w1, once on w2: and one result each (above)
    assert "w1" in {outcome.results[job.request_id].worker_id for job in later if job is not None}
    assert failover_s is not None and failover_s <= RECOVERY_TARGET_S, f"failed over in {failover_s:.2f} s"


def test_a_worker_cut_off_for_less_than_its_heartbeat_timeout_keeps_its_jobs(
    host_pool: HostPoolFactory, record: Callable[[Row], None]
) -> None:
    scenario = "L2. worker host's link cut for a third of the heartbeat timeout"
    cut_s = HEARTBEAT_TIMEOUT_S / 3
    pool = host_pool("c1", "w1", "w2", "client")
    pool.start_workers("w1", "w2", token_delay_s=TOKEN_DELAY_S, slots=2)
    words = 20
    jobs = [pool.submit_from("client", _words(words, f"job{i}"), max_tokens=words + 1) for i in range(4)]
    assert all(jobs)
    holder = {job.request_id: job.worker_id for job in jobs if job is not None}
    wait_for(lambda: len(pool.held_by("w1")) == 2, 10, "w1 running its jobs")

    beat_key = keys.heartbeat_key("w1")
    w1 = pool.hosts["w1"]
    w1.cut()
    cut_until = time.monotonic() + cut_s
    lowest_ttl_ms = HEARTBEAT_TIMEOUT_S * 1000
    try:
        # The fault lasts cut_s; meanwhile watch w1's heartbeat key run down (it must not lapse).
        while time.monotonic() < cut_until:
            lowest_ttl_ms = min(lowest_ttl_ms, pool.client.pttl(beat_key))
            threading.Event().wait(POLL_S)
    finally:
        w1.restore()
    restored_at = time.monotonic()
    fresh_ms = (HEARTBEAT_TIMEOUT_S - HEARTBEAT_INTERVAL_S) * 1000  # a beat landed since the cut

    def beat_landed() -> bool:
        nonlocal lowest_ttl_ms
        ttl = pool.client.pttl(beat_key)
        lowest_ttl_ms = min(lowest_ttl_ms, ttl)
        return ttl > fresh_ms

    wait_for(beat_landed, 2 * HEARTBEAT_TIMEOUT_S, "w1's first beat after the link came back")
    beat_back_s = time.monotonic() - restored_at

    outcome = pool.settle()
    record(outcome.row(scenario, beat_back_s))
    print(f"{scenario}: first beat {beat_back_s:.2f} s after the link came back, lowest TTL {lowest_ttl_ms} ms")

    outcome.assert_invariant()
    assert lowest_ttl_ms > 0, "w1's heartbeat key lapsed during a cut shorter than the heartbeat timeout"
    assert {rid: r.worker_id for rid, r in outcome.results.items()} == holder, "a job moved"
    assert {rid: n for rid, n in pool.started_counts().items() if n != 1} == {}, "a job ran twice"
    assert "result discarded" not in pool.log_of("w1")


def test_a_coordinator_cut_off_from_redis_answers_503_and_recovers_by_itself(
    host_pool: HostPoolFactory, record: Callable[[Row], None]
) -> None:
    scenario = "L3. coordinator host's link to Redis cut, client on the coordinator's host"
    pool = host_pool("c1", "w1", "w2")  # the client is on c1's host: it reaches c1 while c1 reaches nothing
    pool.start_workers("w1", "w2", token_delay_s=TOKEN_DELAY_S, slots=2)
    before = [pool.submit_from("c1", _words(5, f"before{i}"), max_tokens=6) for i in range(4)]
    assert all(before)
    c1 = pool.hosts["c1"]
    http = pool.http_on("c1")
    body = {"model": "fake", "prompt": "refused", "options": {"max_tokens": 2}}

    c1.cut()
    try:
        with c1.entered():
            health = http.get(f"{pool.url('c1')}/health")
            started = time.monotonic()
            refused = http.post(f"{pool.url('c1')}/inference", json=body, timeout=30)
            refused_in_s = time.monotonic() - started
            health_again = http.get(f"{pool.url('c1')}/health")
    finally:
        c1.restore()
    restored_at = time.monotonic()
    assert health.status_code == 503 and health.headers.get("retry-after") == "1"
    assert health.json() == {"status": "unhealthy", "redis": "disconnected"}
    assert refused.status_code == 503 and refused.headers.get("retry-after") == "1"
    assert refused.json()["error"]["code"] == "redis_unavailable"
    assert health_again.status_code == 503
    # On a cut link nothing refuses: the request waits out the coordinator's Redis reply timeout
    # (coordinator/app.py), counted from the first command the link left unanswered, and no more.
    assert refused_in_s < REDIS_REPLY_TIMEOUT_S + 1, f"the 503 took {refused_in_s:.2f} s"

    accepted: list[Submitted] = []

    def admits() -> bool:
        job = pool.submit_from("c1", _words(3, "after"), max_tokens=4)
        if job is not None:
            accepted.append(job)
        return job is not None

    wait_for(admits, 30, "c1 to accept a job again")
    recover_s = time.monotonic() - restored_at
    assert pool.health("c1") == 200
    after = [pool.submit_from("c1", _words(3, f"after{i}"), max_tokens=4) for i in range(3)]
    assert all(after)

    outcome = pool.settle()
    record(outcome.row(scenario, recover_s))
    print(f"{scenario}: a request during the cut got its 503 in {refused_in_s:.2f} s; accepting again "
          f"{recover_s:.2f} s after the link came back")  # fmt: skip
    outcome.assert_invariant()
    assert outcome.completed == len(before) + len(accepted) + len(after)


@dataclass
class StreamReader:
    """A client on the client host: streams a job through `first`, and when no event comes for
    `stall_s` follows it on `second` (`GET /stream/{id}` with `Last-Event-ID`)."""

    pool: HostPool
    prompt: str
    max_tokens: int
    stall_s: float
    events: list[tuple[str, str]] = field(default_factory=list)  # (event id, text) of each token
    result: dict[str, object] | None = None
    request_id: str | None = None
    worker_id: str = ""
    switched_at: float | None = None
    first_token_after_switch_at: float | None = None
    error: BaseException | None = None
    tokens_seen: threading.Event = field(default_factory=threading.Event)

    def run(self, first: str, second: str) -> None:
        try:
            with self.pool.hosts["client"].entered():
                timeout = httpx.Timeout(10, read=self.stall_s)
                with httpx.Client(timeout=timeout, headers=self.pool.headers) as http:
                    body = {"model": "fake", "prompt": self.prompt, "stream": True,
                            "options": {"max_tokens": self.max_tokens}}  # fmt: skip
                    try:
                        with http.stream("POST", f"{self.pool.url(first)}/inference", json=body) as response:
                            assert response.status_code == 200, response.read()
                            self._read(response)
                    except httpx.TransportError:  # no event for stall_s: the coordinator is gone
                        self.switched_at = time.time()
                    if self.result is None:
                        assert self.request_id is not None and self.events
                        headers = {"Last-Event-ID": self.events[-1][0]}
                        url = f"{self.pool.url(second)}/stream/{self.request_id}"
                        with http.stream("GET", url, headers=headers) as response:
                            assert response.status_code == 200, response.read()
                            self._read(response)
        except BaseException as e:  # surfaced in the test's thread
            self.error = e

    def _read(self, response: httpx.Response) -> None:
        event_id = event = ""
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "queued":
                    self.request_id, self.worker_id = data["request_id"], data["worker_id"]
                elif event == "token":
                    if self.switched_at is not None and self.first_token_after_switch_at is None:
                        self.first_token_after_switch_at = time.time()
                    self.events.append((event_id, data["text"]))
                    if len(self.events) >= 3:
                        self.tokens_seen.set()
                elif event == "result":
                    self.result = data
                    return


def test_clients_streaming_through_a_coordinator_cut_off_finish_through_another_without_loss_or_repeat(
    host_pool: HostPoolFactory, record: Callable[[Row], None]
) -> None:
    scenario = "L4. coordinator host cut off mid-stream, clients follow on another"
    pool = host_pool("c1", "c2", "w1", "w2", "client")
    pool.start_workers("w1", token_delay_s=TOKEN_DELAY_S, slots=2, coordinator="c1")
    pool.start_workers("w2", token_delay_s=TOKEN_DELAY_S, slots=2, coordinator="c2")
    words, stall_s = 40, 1.0  # 4 s a stream; a client gives a silent coordinator 1 s (10 token intervals)
    readers = [StreamReader(pool, _words(words, f"stream{i}"), words + 1, stall_s) for i in range(4)]
    threads = [threading.Thread(target=r.run, args=("c1", "c2"), daemon=True) for r in readers]
    for thread in threads:
        thread.start()
    for reader in readers:
        assert reader.tokens_seen.wait(20), reader.error
    cut_at = time.time()
    pool.hosts["c1"].cut()
    try:
        for thread in threads:
            thread.join(timeout=30)
    finally:
        pool.hosts["c1"].restore()
    for reader in readers:
        assert reader.error is None, reader.error
        assert reader.request_id is not None and reader.result is not None
        pool.track(Submitted(reader.request_id, pool.url("c1"), reader.worker_id, reader.prompt,
                             reader.max_tokens, cut_at))  # fmt: skip

    outcome = pool.settle(via="c2")
    switched = [r.first_token_after_switch_at - cut_at for r in readers if r.first_token_after_switch_at]
    recover_s = max(switched, default=None)
    record(outcome.row(scenario, recover_s))
    print(f"{scenario}: {len(switched)} of {len(readers)} clients followed on c2, worst gap {recover_s} s")

    outcome.assert_invariant()
    assert len(switched) == len(readers), "a stream ended before the cut: the scenario tested nothing"
    for reader in readers:
        text = "".join(t for _, t in reader.events)
        assert text == expected_output(reader.prompt, reader.max_tokens), "a token was lost or repeated"
        assert reader.result is not None and reader.result["output"] == text
        ids = [event_id for event_id, _ in reader.events]
        assert len(set(ids)) == len(ids)
    assert recover_s is not None and recover_s <= stall_s + 2.0
