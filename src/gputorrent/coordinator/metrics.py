"""Prometheus metrics: this coordinator's HTTP requests, and the pool as Redis shows it at scrape time.

`gputorrent_requests_total` counts the requests this process answered. Everything about the
pool (workers, slots, queues, and the job counters and histograms each worker carries in its
heartbeat) is read from Redis when scraped, by `PoolCollector`, so every coordinator of one pool
exports the same per-worker series: scrape one, or keep one copy per `worker` label.

The per-worker series grow with the pool: about 65 a worker serving one model, so 650,000 and
5 s of this process's time a scrape at 10,000 workers (docs/observability.md). A scrape can
leave them out (`per_worker=False`) and keep what does not grow with the pool: the pool's
totals, and the job counters and histograms summed by model (`PoolTotals`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gputorrent import replication
from gputorrent.protocol import WorkerState
from gputorrent.telemetry import HISTOGRAM_BOUNDS_S, Histogram, ModelCounters

UNMATCHED_ROUTE = "unmatched"  # any path no route serves: one label value, not one per path a scanner tries


class _Labels:
    """What a request learns on its way through the app that its metric needs: its route and model."""

    __slots__ = ("model", "route")

    def __init__(self) -> None:
        self.model = ""
        self.route = UNMATCHED_ROUTE


_labels: ContextVar[_Labels | None] = ContextVar("gputorrent_request_labels", default=None)


def note_model(model: str) -> None:
    """Label the current request with `model`. Called only for a model a live worker serves, so a client
    cannot make the label take unbounded values by asking for made-up models."""
    labels = _labels.get()
    if labels is not None:
        labels.model = model


class RequestMetrics:
    """ASGI middleware counting every HTTP request by route template, model and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "gputorrent_requests",
            "HTTP requests this coordinator answered, by route, model (admitted requests only) and status",
            ["route", "model", "status"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        labels = _Labels()
        token = _labels.set(labels)
        status = 500  # what the client gets if the app fails before it answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _labels.reset(token)
            self.requests.labels(route=labels.route, model=labels.model, status=str(status)).inc()


class RouteNote:
    """ASGI middleware, innermost: notes the route template the router chose for `RequestMetrics`.

    The router marks its choice in the scope it is given; a middleware that rewrites the scope
    passes a copy down, so only a middleware below all of them sees the mark.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            labels = _labels.get()
            route = getattr(scope.get("route"), "path", None)
            if labels is not None and route:
                labels.route = str(route)


_COUNTERS = ("completed", "failed", "prompt_tokens", "tokens_generated")
_HISTOGRAMS = ("queue_wait", "time_to_first_token", "latency")


@dataclass
class _Sums:
    """What the workers counted for one model, summed: the counters of `_COUNTERS`, then the buckets and
    the sum of each histogram of `_HISTOGRAMS`."""

    counters: list[int] = field(default_factory=lambda: [0] * len(_COUNTERS))
    buckets: list[list[int]] = field(default_factory=lambda: [[0] * (len(HISTOGRAM_BOUNDS_S) + 1) for _ in _HISTOGRAMS])
    sums_s: list[float] = field(default_factory=lambda: [0.0] * len(_HISTOGRAMS))

    def add(self, now: ModelCounters, before: ModelCounters | None) -> None:
        """Add what `now` counts beyond `before` (beyond zero when None)."""
        for i, name in enumerate(_COUNTERS):
            self.counters[i] += getattr(now, name) - (getattr(before, name) if before else 0)
        for i, name in enumerate(_HISTOGRAMS):
            counted: Histogram = getattr(now, name)
            earlier: Histogram = getattr(before, name) if before else Histogram.empty()
            for j, (count, count_before) in enumerate(zip(counted.counts, earlier.counts, strict=True)):
                self.buckets[i][j] += count - count_before
            self.sums_s[i] += counted.sum_s - earlier.sum_s

    def counted(self) -> ModelCounters:
        histograms = {
            name: Histogram(counts=self.buckets[i], sum_s=round(max(0.0, self.sums_s[i]), 6))
            for i, name in enumerate(_HISTOGRAMS)
        }
        return ModelCounters(**dict(zip(_COUNTERS, self.counters, strict=True)), **histograms)


def _went_back(now: ModelCounters, before: ModelCounters) -> bool:
    """Whether a counter, a histogram's bucket or its sum went back: the worker started again from zero."""
    if any(getattr(now, name) < getattr(before, name) for name in _COUNTERS):
        return True
    if any(getattr(now, name).sum_s < getattr(before, name).sum_s for name in _HISTOGRAMS):
        return True
    pairs = (zip(getattr(now, name).counts, getattr(before, name).counts, strict=True) for name in _HISTOGRAMS)
    return any(n < b for pair in pairs for n, b in pair)


@dataclass(frozen=True)
class _Seen:
    """What a worker's heartbeat said at a scrape: its registration (a new one is a restart), when it
    sampled its figures, and the figures (None: registered, but no heartbeat read yet)."""

    registered_at: float
    sampled_at: float
    jobs: dict[str, ModelCounters] | None


class PoolTotals:
    """The job counters and histograms of every worker, summed by model, as counters that never go
    back: a sum of the workers' own would drop whenever one leaves or restarts, which Prometheus
    reads as a reset of the whole pool's count.

    Each scrape adds what each worker counted since the last one; a worker that restarted (it
    registered again, or a count went back) adds all it counts now, as Prometheus itself treats a
    reset. The first scrape only notes where every registered worker stands (a dead one: at its
    first heartbeat read later), so the totals count from this process's first scrape, and a new
    coordinator starts from zero (a reset, to Prometheus); a worker first registered later adds all
    it counts. A worker stays known while it is registered, dead or not, so one that comes back
    with its counts is not counted twice; a sample older than one already read is passed over.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes may run side by side, each on a thread of its own
        self._seen: dict[str, _Seen] | None = None  # by worker id; None before the first scrape
        self._sums: dict[str, _Sums] = {}

    def update(self, workers: Iterable[WorkerState]) -> dict[str, ModelCounters]:
        """Add what `workers` counted since the last call; the totals by model."""
        with self._lock:
            known = self._seen
            seen: dict[str, _Seen] = {}
            for w in workers:
                last = known.get(w.worker_id) if known is not None else None
                if w.telemetry is None or (last is not None and w.telemetry.sampled_at < last.sampled_at):
                    # No heartbeat to read (dead), or an older one: what it counted stays as known.
                    seen[w.worker_id] = last or _Seen(w.registered_at, 0.0, None)
                    continue
                now = _Seen(w.registered_at, w.telemetry.sampled_at, w.telemetry.jobs)
                seen[w.worker_id] = now
                starting = known is None or (last is not None and last.jobs is None)  # where it stands: no add
                restarted = last is not None and last.registered_at != w.registered_at
                for model, counted in w.telemetry.jobs.items():
                    sums = self._sums.setdefault(model, _Sums())
                    if starting and not restarted:
                        continue
                    before = None if last is None or restarted or last.jobs is None else last.jobs.get(model)
                    if before is None or _went_back(counted, before):
                        sums.add(counted, None)
                    elif counted != before:
                        sums.add(counted, before)
            self._seen = seen
            return {model: sums.counted() for model, sums in self._sums.items()}


class PoolCollector(Collector):
    """The pool as one snapshot of `registry.snapshot` shows it, as Prometheus metric families: the
    per-worker series when `per_worker`, and always the pool's totals and `totals` by model."""

    def __init__(self, workers: list[WorkerState], totals: dict[str, ModelCounters], *, per_worker: bool) -> None:
        self.workers = workers
        self.totals = totals
        self.per_worker = per_worker

    def collect(self) -> Iterator[Metric]:
        yield from self._pool_gauges()
        yield from self._pool_job_metrics()
        if self.per_worker:
            yield from self._worker_gauges()
            yield from self._machine_gauges()
            yield from self._job_metrics()

    def _pool_gauges(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("gputorrent_workers", "Registered workers by state", labels=["state"])
        for state in ("alive", "draining", "unhealthy", "dead"):
            by_state.add_metric([state], sum(1 for w in self.workers if w.state == state))
        yield by_state
        live = [w for w in self.workers if w.state != "dead"]
        yield GaugeMetricFamily("gputorrent_pool_slots", "Jobs the live workers run at once",
                                value=sum(w.slots for w in live))  # fmt: skip
        yield GaugeMetricFamily("gputorrent_pool_slots_busy", "Jobs the live workers are running",
                                value=sum(w.jobs_in_flight for w in live))  # fmt: skip
        yield GaugeMetricFamily("gputorrent_pool_queue_length", "Jobs waiting in the workers' queues",
                                value=sum(w.queue_length for w in self.workers))  # fmt: skip
        model_queue = GaugeMetricFamily(
            "gputorrent_model_queue_length", "Jobs waiting on the workers that serve a model", labels=["model"]
        )
        for model in sorted({m for w in self.workers for m in w.models}):
            model_queue.add_metric([model], sum(w.queue_length for w in self.workers if model in w.models))
        yield model_queue
        gpus = GaugeMetricFamily("gputorrent_pool_gpus", "GPUs of the live workers, by name", labels=["name"])
        by_name: dict[str, int] = {}
        for w in live:
            for g in w.telemetry.machine.gpus if w.telemetry else []:
                by_name[g.name] = by_name.get(g.name, 0) + 1
        for name, count in sorted(by_name.items()):
            gpus.add_metric([name], count)
        yield gpus

    def _pool_job_metrics(self) -> Iterator[Metric]:
        rows = (([model], counters) for model, counters in sorted(self.totals.items()))
        yield from _job_families(
            "gputorrent_pool_", ["model"], rows, jobs_help="Jobs the workers finished, by model and outcome",
            whose="the workers",
        )  # fmt: skip

    def _worker_gauges(self) -> Iterator[Metric]:
        slots = GaugeMetricFamily("gputorrent_worker_slots", "Jobs a live worker runs at once", labels=["worker"])
        busy = GaugeMetricFamily("gputorrent_worker_slots_busy", "Jobs a live worker is running", labels=["worker"])
        queued = GaugeMetricFamily("gputorrent_worker_queue_length", "Jobs waiting in a worker's queue",
                                   labels=["worker"])  # fmt: skip
        for w in self.workers:
            queued.add_metric([w.worker_id], w.queue_length)
            if w.state != "dead":
                slots.add_metric([w.worker_id], w.slots)
                busy.add_metric([w.worker_id], w.jobs_in_flight)
        yield from (slots, busy, queued)

    def _machine_gauges(self) -> Iterator[Metric]:
        gpu = ["worker", "gpu", "name"]
        families = {
            "memory_used": GaugeMetricFamily("gputorrent_gpu_memory_used_bytes", "GPU memory in use", labels=gpu),
            "memory_total": GaugeMetricFamily("gputorrent_gpu_memory_total_bytes", "GPU memory", labels=gpu),
            "utilization": GaugeMetricFamily("gputorrent_gpu_utilization_ratio", "GPU busy time (0-1)", labels=gpu),
            "temperature": GaugeMetricFamily("gputorrent_gpu_temperature_celsius", "GPU temperature", labels=gpu),
        }
        cpu = GaugeMetricFamily("gputorrent_worker_cpu_utilization_ratio", "Worker machine CPU use (0-1)",
                                labels=["worker"])  # fmt: skip
        ram_used = GaugeMetricFamily("gputorrent_worker_ram_used_bytes", "Worker machine RAM in use", labels=["worker"])
        ram_total = GaugeMetricFamily("gputorrent_worker_ram_total_bytes", "Worker machine RAM", labels=["worker"])
        for w in self.workers:
            if w.telemetry is None:
                continue
            machine = w.telemetry.machine
            for g in machine.gpus:
                labels = [w.worker_id, str(g.index), g.name]
                readings = {
                    "memory_used": g.memory_used_bytes, "memory_total": g.memory_total_bytes,
                    "utilization": g.utilization_ratio, "temperature": g.temperature_celsius,
                }  # fmt: skip
                for key, value in readings.items():
                    if value is not None:
                        families[key].add_metric(labels, value)
            for family, value in ((cpu, machine.cpu_utilization_ratio), (ram_used, machine.ram_used_bytes),
                                  (ram_total, machine.ram_total_bytes)):  # fmt: skip
                if value is not None:
                    family.add_metric([w.worker_id], value)
        yield from (*families.values(), cpu, ram_used, ram_total)

    def _job_metrics(self) -> Iterator[Metric]:
        rows = (
            ([w.worker_id, model], counters)
            for w in self.workers
            for model, counters in sorted((w.telemetry.jobs if w.telemetry else {}).items())
        )
        yield from _job_families(
            "gputorrent_", ["worker", "model"], rows, jobs_help="Jobs a worker finished, by outcome", whose="workers"
        )


def _job_families(
    prefix: str, labels: list[str], rows: Iterable[tuple[list[str], ModelCounters]], *, jobs_help: str, whose: str
) -> Iterator[Metric]:
    """The job counters and latency histograms of `rows` (label values, counters), named `prefix` + metric,
    for each worker (`gputorrent_`) or summed by model (`gputorrent_pool_`)."""
    jobs = CounterMetricFamily(f"{prefix}jobs", jobs_help, labels=[*labels, "status"])
    generated = CounterMetricFamily(f"{prefix}tokens_generated", f"Tokens {whose} generated", labels=labels)
    prompt = CounterMetricFamily(f"{prefix}prompt_tokens", f"Prompt tokens {whose} read", labels=labels)
    histograms = {
        "queue_wait": HistogramMetricFamily(
            f"{prefix}queue_wait_seconds", "Admission to the start of the job", labels=labels
        ),
        "time_to_first_token": HistogramMetricFamily(
            f"{prefix}time_to_first_token_seconds", "Admission to the first generated token", labels=labels
        ),
        "latency": HistogramMetricFamily(
            f"{prefix}request_latency_seconds", "Admission to the stored result", labels=labels
        ),
    }
    for values, counters in rows:
        jobs.add_metric([*values, "completed"], counters.completed)
        jobs.add_metric([*values, "failed"], counters.failed)
        generated.add_metric(values, counters.tokens_generated)
        prompt.add_metric(values, counters.prompt_tokens)
        for name, family in histograms.items():
            histogram: Histogram = getattr(counters, name)
            family.add_metric(values, histogram.cumulative(), histogram.sum_s)
    yield from (jobs, generated, prompt, *histograms.values())


class ReplicationCollector(Collector):
    """This process's writes that fewer replicas than wanted had in time, so not acknowledged (replication.py)."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gputorrent_unreplicated_writes",
            "Admissions and results this coordinator wrote that fewer replicas than GPUTORRENT_WAIT_REPLICAS "
            "had within GPUTORRENT_WAIT_TIMEOUT_MS, so answered 503 instead of acknowledged",
            labels=["write"],
        )
        for write in get_args(replication.Write):
            family.add_metric([write], replication.unreplicated[write])
        yield family


def exposition(
    process: CollectorRegistry, workers: list[WorkerState], totals: PoolTotals, *, per_worker: bool
) -> bytes:
    """The text exposition of this process's metrics followed by the pool's (see `PoolCollector`)."""
    pool = CollectorRegistry(auto_describe=False)
    pool.register(PoolCollector(workers, totals.update(workers), per_worker=per_worker))
    return generate_latest(process) + generate_latest(pool)
