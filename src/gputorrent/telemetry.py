"""What a worker reports about itself on every heartbeat: its machine and the jobs it has run.

The job figures are cumulative since the worker started (counters and histograms, as a
Prometheus target would expose them). Workers listen on nothing, so a coordinator exports them
from the heartbeats at scrape time; a worker that restarts starts again from zero, which
Prometheus reads as a counter reset.

>>> h = Histogram.empty().observe(0.3).observe(7.0)
>>> h.count, h.sum_s, h.counts[HISTOGRAM_BOUNDS_S.index(0.5)]
(2, 7.3, 1)
"""

from __future__ import annotations

import bisect
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds (seconds) of the latency histograms; the last count is everything above them (+Inf).
HISTOGRAM_BOUNDS_S: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


MAX_COUNT = 2**53  # the largest integer a JSON reader keeps exact
MAX_BYTES = 2**60
MAX_SECONDS = 1e10  # a sum of durations, or a unix time (the year 2286)
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class _Model(BaseModel):
    # No NaN or infinity: JSON has neither, so one would be stored as null and fail every later read.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GPUSample(_Model):
    """One GPU as NVML sees it; a figure NVML cannot read is None."""

    index: int = Field(ge=0, le=1024)
    name: str = Field(max_length=256)
    memory_used_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)
    memory_total_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)
    utilization_ratio: float | None = Field(default=None, ge=0, le=1)
    temperature_celsius: float | None = Field(default=None, ge=-273.15, le=1000)


class MachineSample(_Model):
    """The worker's machine now: its GPUs where NVML answers, and always CPU and RAM."""

    gpus: list[GPUSample] = Field(default_factory=list, max_length=64)
    cpu_utilization_ratio: float | None = Field(default=None, ge=0, le=1)  # the whole machine, since the last sample
    ram_used_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)
    ram_total_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)


class Histogram(_Model):
    """Observations per bucket of `HISTOGRAM_BOUNDS_S` (not cumulative), plus one above the last bound."""

    counts: list[Count] = Field(min_length=len(HISTOGRAM_BOUNDS_S) + 1, max_length=len(HISTOGRAM_BOUNDS_S) + 1)
    sum_s: float = Field(default=0.0, ge=0, le=MAX_SECONDS * MAX_COUNT)

    @classmethod
    def empty(cls) -> Histogram:
        return cls(counts=[0] * (len(HISTOGRAM_BOUNDS_S) + 1))

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value_s: float) -> Histogram:
        """A copy with one more observation (a bound is inclusive, as Prometheus's `le` is)."""
        counts = list(self.counts)
        counts[bisect.bisect_left(HISTOGRAM_BOUNDS_S, value_s)] += 1
        return Histogram(counts=counts, sum_s=round(self.sum_s + value_s, 6))

    def cumulative(self) -> list[tuple[str, int]]:
        """`(le, count)` pairs as the Prometheus exposition wants them, ending with `+Inf`."""
        bounds = [repr(b) for b in HISTOGRAM_BOUNDS_S] + ["+Inf"]
        total, pairs = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


class ModelCounters(_Model):
    """What one worker has done for one model since it started."""

    completed: Count = 0
    failed: Count = 0
    prompt_tokens: Count = 0
    tokens_generated: Count = 0
    queue_wait: Histogram = Field(default_factory=Histogram.empty)  # admission to start
    time_to_first_token: Histogram = Field(default_factory=Histogram.empty)  # admission to first token
    latency: Histogram = Field(default_factory=Histogram.empty)  # admission to result


class Telemetry(_Model):
    """The sample a heartbeat carries."""

    sampled_at: float = Field(ge=0, le=MAX_SECONDS)  # unix time, seconds
    machine: MachineSample = Field(default_factory=MachineSample)
    jobs: dict[str, ModelCounters] = Field(default_factory=dict, max_length=256)  # by model (256 at most registered)


class FailureRecord(_Model):
    """One failed job, as the recent-failures list keeps it."""

    at: float  # unix time, seconds
    request_id: str
    model: str
    worker_id: str
    code: str
    message: str
