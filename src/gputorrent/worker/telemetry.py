"""The worker's telemetry: a cheap sample of its machine for every heartbeat, and the figures of
the jobs it finished (cumulative in the heartbeat, and as deltas into the pool's history).

GPUs are read through NVML (the optional `nvidia-ml-py` package) when it loads and finds a
driver; otherwise the sample has CPU and RAM only. Jobs are counted on the event loop and
samples taken on the heartbeat thread, so the counters sit behind a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import TypeVar

import psutil

from gputorrent import pool_stats
from gputorrent.protocol import Job, JobResult
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.telemetry import GPUSample, MachineSample, ModelCounters, Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerTelemetry:
    """Samples the machine and counts finished jobs for one worker."""

    def __init__(self, worker_id: str, *, use_nvml: bool = True) -> None:
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._jobs: dict[str, ModelCounters] = {}
        self._pending = pool_stats.StatsDelta()
        self._nvml = _open_nvml() if use_nvml else None
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; later ones cover the time since

    def record(self, job: Job, result: JobResult, finished_at: float | None = None) -> None:
        """Count a job whose result this worker stored."""
        finished_at = time.time() if finished_at is None else finished_at
        delta = pool_stats.job_delta(job, result, self.worker_id, finished_at)
        if not delta:  # a job the history does not count (a pull)
            return
        with self._lock:
            counters = self._jobs.get(job.model, ModelCounters())
            update = {
                "completed": counters.completed + (not delta.failed),
                "failed": counters.failed + delta.failed,
                "prompt_tokens": counters.prompt_tokens + result.usage.prompt_tokens,
                "tokens_generated": counters.tokens_generated + result.usage.completion_tokens,
                "queue_wait": counters.queue_wait.observe(delta.queue_wait_sum_s),
                "latency": counters.latency.observe(delta.latency_sum_s),
            }
            if delta.ttft_count:
                update["time_to_first_token"] = counters.time_to_first_token.observe(delta.ttft_sum_s)
            self._jobs[job.model] = counters.model_copy(update=update)
            self._pending.add(delta)

    def sample(self) -> Telemetry:
        """The machine now and the job counters so far (for the heartbeat: milliseconds of work)."""
        memory = psutil.virtual_memory()
        machine = MachineSample(
            gpus=_gpu_samples(self._nvml) if self._nvml is not None else [],
            cpu_utilization_ratio=min(1.0, psutil.cpu_percent(interval=None) / 100),
            ram_used_bytes=memory.total - memory.available,
            ram_total_bytes=memory.total,
        )
        with self._lock:
            jobs = dict(self._jobs)
        return Telemetry(sampled_at=time.time(), machine=machine, jobs=jobs)

    async def flush(self, redis: RedisClient) -> None:
        """Add the jobs finished since the last flush to the pool's history; kept for the next one if Redis fails."""
        with self._lock:
            pending, self._pending = self._pending, pool_stats.StatsDelta()
        try:
            await pool_stats.add(redis, pending)
        except REDIS_FAILURES as e:
            log.warning("worker %s: job figures not written yet (%s)", self.worker_id, e)
            with self._lock:
                pending.add(self._pending)  # what finished meanwhile is later
                self._pending = pending

    async def run(self, redis: RedisClient, interval_s: float, stop: asyncio.Event) -> None:
        """Flush every `interval_s` until `stop`, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            await self.flush(redis)


def _open_nvml() -> ModuleType | None:
    """NVML, initialised, or None (the package is missing, or no NVIDIA driver answers)."""
    try:
        import pynvml
    except ImportError:
        return None
    nvml: ModuleType = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:  # no driver or no GPU: CPU figures only
        log.debug("no GPU telemetry: %s", e)
        return None
    return nvml


def _read(nvml: ModuleType, call: Callable[[], T]) -> T | None:
    """One NVML reading; None where the GPU does not support it."""
    try:
        return call()
    except nvml.NVMLError:
        return None


def _gpu_samples(nvml: ModuleType) -> list[GPUSample]:
    count = _read(nvml, nvml.nvmlDeviceGetCount) or 0
    samples = []
    for index in range(count):
        handle = _read(nvml, partial(nvml.nvmlDeviceGetHandleByIndex, index))
        if handle is None:
            continue
        name = _read(nvml, partial(nvml.nvmlDeviceGetName, handle))
        memory = _read(nvml, partial(nvml.nvmlDeviceGetMemoryInfo, handle))
        utilization = _read(nvml, partial(nvml.nvmlDeviceGetUtilizationRates, handle))
        temperature = _read(nvml, partial(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU))
        samples.append(
            GPUSample(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name or f"GPU {index}"),
                memory_used_bytes=int(memory.used) if memory is not None else None,
                memory_total_bytes=int(memory.total) if memory is not None else None,
                utilization_ratio=min(1.0, utilization.gpu / 100) if utilization is not None else None,
                temperature_celsius=float(temperature) if temperature is not None else None,
            )
        )
    return samples
