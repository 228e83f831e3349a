"""Telemetry, metrics exposition, log formatting and the status view, on hand-built data (no sockets)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gputorrent import logs
from gputorrent.coordinator import metrics, pool_view
from gputorrent.pool_stats import HistoryPoint, StatsDelta
from gputorrent.protocol import ErrorInfo, Hardware, Job, JobResult, Timings, Usage, WorkerState
from gputorrent.status import render
from gputorrent.telemetry import HISTOGRAM_BOUNDS_S, GPUSample, Histogram, MachineSample, ModelCounters, Telemetry
from gputorrent.worker.telemetry import WorkerTelemetry


def _job(model: str = "m", enqueued_at: float = 100.0) -> Job:
    return Job(request_id="r1", worker_id="w1", model=model, prompt="p", enqueued_at=enqueued_at)


def _result(status: str = "completed", first_token_ms: float | None = 40.0, tokens: int = 5) -> JobResult:
    return JobResult(
        request_id="r1", status=status, model="m", worker_id="w1",
        usage=Usage(prompt_tokens=3, completion_tokens=tokens),
        timings=Timings(queued_ms=200.0, inference_ms=800.0, first_token_ms=first_token_ms),
        error=ErrorInfo(code="backend_error", message="x" * 2000) if status == "failed" else None,
    )  # fmt: skip


def test_a_histogram_bound_is_inclusive_and_cumulative_counts_end_at_inf() -> None:
    h = Histogram.empty().observe(0.1).observe(0.1000001).observe(1000.0)
    pairs = dict(h.cumulative())
    assert pairs["0.1"] == 1 and pairs["0.25"] == 2
    assert pairs["+Inf"] == 3 == h.count
    assert len(pairs) == len(HISTOGRAM_BOUNDS_S) + 1


def test_worker_telemetry_counts_jobs_and_samples_cpu_and_ram_without_a_gpu() -> None:
    telemetry = WorkerTelemetry("w1")  # NVML is installed but finds no driver here: the CPU path
    telemetry.record(_job(), _result(), finished_at=101.5)
    telemetry.record(_job(), _result("failed", first_token_ms=None, tokens=0), finished_at=102.0)

    sample = telemetry.sample()

    assert sample.machine.gpus == []
    assert sample.machine.ram_total_bytes and 0 < (sample.machine.ram_used_bytes or 0) <= sample.machine.ram_total_bytes
    assert sample.machine.cpu_utilization_ratio is not None and 0 <= sample.machine.cpu_utilization_ratio <= 1
    counters = sample.jobs["m"]
    assert (counters.completed, counters.failed, counters.tokens_generated, counters.prompt_tokens) == (1, 1, 5, 6)
    assert counters.latency.count == 2 and counters.latency.sum_s == pytest.approx(1.5 + 2.0)
    assert counters.queue_wait.sum_s == pytest.approx(0.4)
    assert counters.time_to_first_token.count == 1  # the failed job produced no token
    assert counters.time_to_first_token.sum_s == pytest.approx(0.24)  # queued 200 ms + 40 ms to the first token


def test_sampling_is_cheap_enough_for_every_heartbeat() -> None:
    telemetry = WorkerTelemetry("w1")
    for _ in range(20):
        telemetry.record(_job(), _result())
    started = time.perf_counter()
    for _ in range(50):
        telemetry.sample()
    assert (time.perf_counter() - started) / 50 < 0.01  # the beat is every 2 s by default


def test_a_failure_is_kept_with_its_reason_cut_short() -> None:
    telemetry = WorkerTelemetry("w1", use_nvml=False)
    telemetry.record(_job(), _result("failed"))
    pending = telemetry._pending
    [failure] = pending.failures
    assert (failure.code, failure.worker_id, failure.request_id) == ("backend_error", "w1", "r1")
    assert len(failure.message) == 500
    assert (pending.jobs, pending.failed) == (1, 1)


def test_a_stats_delta_becomes_increments_of_its_bucket() -> None:
    delta = StatsDelta(jobs=2, failed=0, tokens=10, latency_sum_s=1.5)
    commands = delta.commands(at=1007.0)
    assert ("HINCRBY", "stats:1005", "jobs", 2) in commands
    assert ("HINCRBYFLOAT", "stats:1005", "latency_sum_s", 1.5) in commands
    assert not any(c[2] == "failed" for c in commands if c[0].startswith("HINCR"))  # zeros are not sent
    assert commands[-1][0] == "EXPIRE"


def _worker(worker_id: str, state: str = "alive", gpu: bool = False, queue_length: int = 0) -> WorkerState:
    counters = ModelCounters(completed=3, failed=1, tokens_generated=42,
                             time_to_first_token=Histogram.empty().observe(0.2))  # fmt: skip
    machine = MachineSample(
        gpus=[GPUSample(index=0, name="NVIDIA H200", memory_used_bytes=2**30, memory_total_bytes=141 * 2**30,
                        utilization_ratio=0.75, temperature_celsius=61.0)] if gpu else [],
        cpu_utilization_ratio=0.5, ram_used_bytes=2**30, ram_total_bytes=8 * 2**30,
    )  # fmt: skip
    return WorkerState(
        worker_id=worker_id, models=["m"], backend="fake", slots=2, hardware=Hardware(cpu_cores=4), state=state,
        jobs_in_flight=1 if state != "dead" else 0, queue_length=queue_length, last_heartbeat_at=time.time(),
        registered_at=0.0,
        telemetry=Telemetry(sampled_at=0.0, machine=machine, jobs={"m": counters}) if state != "dead" else None,
    )  # fmt: skip


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_pool_collector_exports_workers_slots_gpus_and_job_histograms() -> None:
    workers = [_worker("gpu-box", gpu=True, queue_length=4), _worker("cpu-box"), _worker("gone", state="dead")]
    text = metrics.exposition(CollectorRegistry(), workers, metrics.PoolTotals(), per_worker=True).decode()
    samples = _samples(text)

    assert samples[("gputorrent_workers", frozenset({("state", "alive")}))] == 2
    assert samples[("gputorrent_workers", frozenset({("state", "dead")}))] == 1
    assert samples[("gputorrent_worker_slots", frozenset({("worker", "gpu-box")}))] == 2
    assert ("gputorrent_worker_slots", frozenset({("worker", "gone")})) not in samples
    assert samples[("gputorrent_model_queue_length", frozenset({("model", "m")}))] == 4
    gpu = frozenset({("worker", "gpu-box"), ("gpu", "0"), ("name", "NVIDIA H200")})
    assert samples[("gputorrent_gpu_memory_total_bytes", gpu)] == 141 * 2**30
    assert samples[("gputorrent_gpu_utilization_ratio", gpu)] == 0.75
    assert samples[("gputorrent_gpu_temperature_celsius", gpu)] == 61.0
    assert samples[("gputorrent_worker_ram_total_bytes", frozenset({("worker", "cpu-box")}))] == 8 * 2**30
    labels = frozenset({("worker", "cpu-box"), ("model", "m")})
    assert samples[("gputorrent_tokens_generated_total", labels)] == 42
    assert samples[("gputorrent_jobs_total", labels | {("status", "failed")})] == 1
    assert samples[("gputorrent_time_to_first_token_seconds_count", labels)] == 1
    assert samples[("gputorrent_time_to_first_token_seconds_bucket", labels | {("le", "0.25")})] == 1
    assert samples[("gputorrent_time_to_first_token_seconds_bucket", labels | {("le", "0.1")})] == 0
    assert "# TYPE gputorrent_request_latency_seconds histogram" in text


def _counting(worker_id: str, completed: int, ttft_s: tuple[float, ...] = (), state: str = "alive") -> WorkerState:
    """A worker whose heartbeat says it completed `completed` jobs of model m, with these first-token times."""
    ttft = Histogram.empty()
    for seconds in ttft_s:
        ttft = ttft.observe(seconds)
    telemetry = Telemetry(sampled_at=0.0, jobs={"m": ModelCounters(completed=completed, time_to_first_token=ttft)})
    return _worker(worker_id, state=state).model_copy(update={"telemetry": None if state == "dead" else telemetry})


def test_pool_totals_never_go_back_when_workers_leave_restart_or_miss_beats() -> None:
    totals = metrics.PoolTotals()
    first = totals.update([_counting("a", 5, (0.2,)), _counting("b", 7)])
    assert first["m"].completed == 0  # the first scrape notes where each worker stands

    assert totals.update([_counting("a", 6, (0.2, 3.0)), _counting("b", 7)])["m"].completed == 1
    latest = totals.update([_counting("a", 6, (0.2, 3.0))])  # b left the pool
    assert latest["m"].completed == 1 and dict(latest["m"].time_to_first_token.cumulative())["5.0"] == 1
    assert totals.update([_counting("a", 2), _counting("c", 4)])["m"].completed == 1 + 2 + 4  # a restarted, c is new
    assert totals.update([_counting("a", 2, state="dead"), _counting("c", 4)])["m"].completed == 7  # a missed beats
    assert totals.update([_counting("a", 3), _counting("c", 4)])["m"].completed == 8  # back with its counts: +1
    again = _counting("c", 9).model_copy(update={"registered_at": 1.0})  # c restarted, and ran 9 jobs since
    assert totals.update([_counting("a", 3), again])["m"].completed == 8 + 9


def test_pool_totals_start_a_worker_dead_at_the_first_scrape_where_its_first_heartbeat_stands() -> None:
    totals = metrics.PoolTotals()
    assert totals.update([_counting("a", 0, state="dead")]) == {}
    assert totals.update([_counting("a", 50)])["m"].completed == 0  # done before this coordinator counted
    assert totals.update([_counting("a", 52)])["m"].completed == 2


def test_a_scrape_without_per_worker_series_keeps_what_does_not_grow_with_the_pool() -> None:
    workers = [_worker("gpu-box", gpu=True, queue_length=4), _worker("cpu-box"), _worker("gone", state="dead")]
    totals = metrics.PoolTotals()
    metrics.exposition(CollectorRegistry(), workers, totals, per_worker=False)
    gpu_box = workers[0]
    assert gpu_box.telemetry is not None
    counted = gpu_box.telemetry.jobs["m"]
    telemetry = gpu_box.telemetry.model_copy(update={"jobs": {"m": counted.model_copy(update={"completed": 5})}})
    busier = [gpu_box.model_copy(update={"telemetry": telemetry}), *workers[1:]]  # 2 more than at the first scrape
    samples = _samples(metrics.exposition(CollectorRegistry(), busier, totals, per_worker=False).decode())

    assert not any("worker" in dict(labels) for _, labels in samples)
    assert samples[("gputorrent_workers", frozenset({("state", "alive")}))] == 2
    assert samples[("gputorrent_pool_slots", frozenset())] == 4
    assert samples[("gputorrent_pool_slots_busy", frozenset())] == 2
    assert samples[("gputorrent_pool_queue_length", frozenset())] == 4
    assert samples[("gputorrent_model_queue_length", frozenset({("model", "m")}))] == 4
    assert samples[("gputorrent_pool_jobs_total", frozenset({("model", "m"), ("status", "completed")}))] == 2
    assert samples[("gputorrent_pool_time_to_first_token_seconds_count", frozenset({("model", "m")}))] == 0
    assert samples[("gputorrent_pool_gpus", frozenset({("name", "NVIDIA H200")}))] == 1


def test_rates_weigh_latencies_by_jobs_and_leave_gaps_as_none() -> None:
    points = [
        HistoryPoint(at=0, jobs_per_s=1.0, failed_per_s=0.0, tokens_per_s=10.0, ttft_avg_s=0.1,
                     latency_avg_s=1.0, queue_wait_avg_s=0.0),
        HistoryPoint(at=5, jobs_per_s=3.0, failed_per_s=1.0, tokens_per_s=30.0, ttft_avg_s=0.3,
                     latency_avg_s=2.0, queue_wait_avg_s=0.0),
        HistoryPoint(at=10, jobs_per_s=0.0, failed_per_s=0.0, tokens_per_s=0.0, ttft_avg_s=None,
                     latency_avg_s=None, queue_wait_avg_s=None),
    ]  # fmt: skip
    rates = pool_view.rates(points)
    assert rates.window_s == 15
    assert rates.jobs_per_s == pytest.approx(4 / 3)
    assert rates.ttft_avg_s == pytest.approx((0.1 * 1 + 0.3 * 3) / 4)
    assert pool_view.rates([]).ttft_avg_s is None


def _overview(workers: list[WorkerState], rows: list[WorkerState] | None = None) -> pool_view.PoolOverview:
    """What `/pool` would answer for these workers (showing `rows` of them, or all)."""
    return pool_view.PoolOverview(
        at=time.time(), workers=workers if rows is None else rows, models=pool_view.model_queues(workers),
        totals=pool_view.totals(workers), rates=pool_view.rates([]), bucket_s=5, history=[], failures=None,
    )  # fmt: skip


def test_status_renders_workers_queues_and_rates() -> None:
    workers = [_worker("gpu-box", gpu=True, queue_length=4), _worker("gone", state="dead")]
    text = render(_overview(workers), "http://coord:8000")
    assert "workers: 1 alive of 2, 1 dead | slots busy 1/2 | in flight 1 | queued 4" in text
    gpu_row = next(line for line in text.splitlines() if line.startswith("gpu-box"))
    assert gpu_row.split()[:6] == ["gpu-box", "alive", "fake", "m", "1/2", "4"]
    assert "NVIDIA H200 1.0/141 GiB 75% 61C" in gpu_row
    assert any(line.split()[:5] == ["m", "2", "1", "4", "1"] for line in text.splitlines())


def test_a_large_pool_shows_its_troubled_and_busiest_workers_and_counts_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_view, "MAX_WORKER_ROWS", 3)
    workers = [_worker(f"w{i}", queue_length=i % 3) for i in range(6)] + [_worker("w9", state="dead")]
    rows = pool_view.worker_rows(workers)
    assert [w.worker_id for w in rows] == ["w9", "w2", "w5"]  # not alive first, then the busiest
    assert pool_view.worker_rows(workers[:3]) == workers[:3]  # a small pool: every worker, by id
    text = render(_overview(workers, rows), "http://coord:8000")
    assert "workers: 6 alive of 7, 1 dead" in text
    assert "(3 of 7 workers shown" in text


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("Authorization: Bearer gt_0123456789ab_c2VjcmV0c2VjcmV0c2VjcmV0", "c2VjcmV0c2VjcmV0"),
        ("retrying gt_0123456789ab_abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmnop"),
        ("Error connecting to redis://default:hunter2hunter2@db.lan:6379/0", "hunter2"),
        ("token=hf_abcdefghijklmnopqrstuvwxyz0123", "abcdefghijklmnop"),
        ('{"api_key": "sk-proj-abcdefghijklmnopqrst"}', "abcdefghijklmnop"),
        ("worker_secret=Zm9vYmFyYmF6cXV4", "Zm9vYmFyYmF6cXV4"),
    ],
)
def test_secrets_are_masked_in_log_lines(line: str, secret: str) -> None:
    masked = logs.redact(line)
    assert secret not in masked
    assert "***" in masked


def test_ordinary_log_lines_are_left_alone() -> None:
    line = "request 9f2c completed in 270 ms (16 tokens) max_tokens 16 worker w-1 at http://127.0.0.1:8000"
    assert logs.redact(line) == line


def _format(formatter: logging.Formatter, message: str, *args: object, exc: bool = False) -> str:
    record = logging.LogRecord("gputorrent.test", logging.INFO, __file__, 1, message, args, None)
    if exc:
        try:
            raise RuntimeError("Bearer gt_0123456789ab_c2VjcmV0c2VjcmV0c2VjcmV0")
        except RuntimeError:
            import sys

            record.exc_info = sys.exc_info()
    logs.RequestIdFilter().filter(record)
    return formatter.format(record)


def test_json_lines_carry_the_request_id_of_the_context_and_mask_secrets() -> None:
    token = logs.request_id.set("req-123")
    try:
        line = _format(logs.JsonFormatter(), 'sent "Bearer %s"', "gt_0123456789ab_c2VjcmV0c2VjcmV0c2VjcmV0", exc=True)
    finally:
        logs.request_id.reset(token)
    parsed = json.loads(line)  # still valid JSON after masking
    assert parsed["request_id"] == "req-123"
    assert parsed["level"] == "info" and parsed["logger"] == "gputorrent.test"
    assert parsed["message"] == 'sent "Bearer ***"'
    assert "c2VjcmV0" not in parsed["exception"] and "RuntimeError" in parsed["exception"]


def test_text_lines_tag_the_request_only_inside_one() -> None:
    assert ": plain" in _format(logs.TextFormatter(), "plain") and "[" not in _format(logs.TextFormatter(), "plain")
    token = logs.request_id.set("req-9")
    try:
        assert "gputorrent.test [req-9]: inside" in _format(logs.TextFormatter(), "inside")
    finally:
        logs.request_id.reset(token)


def test_configure_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    level, foreign = root.level, logging.NullHandler()
    root.addHandler(foreign)
    try:
        logs.configure("warning", "json")
        logs.configure("warning", "text")
        ours = [h for h in root.handlers if h.get_name() == "gputorrent"]
        assert len(ours) == 1 and isinstance(ours[0].formatter, logs.TextFormatter)
        assert foreign in root.handlers
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "gputorrent"] + [foreign]:
            root.removeHandler(handler)
        root.setLevel(level)
