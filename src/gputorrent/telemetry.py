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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPUSample(_Model):
    """One GPU as NVML sees it; a figure NVML cannot read is None."""

    index: int = Field(ge=0)
    name: str
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)
    utilization_ratio: float | None = Field(default=None, ge=0, le=1)
    temperature_celsius: float | None = None


class MachineSample(_Model):
    """The worker's machine now: its GPUs where NVML answers, and always CPU and RAM."""

    gpus: list[GPUSample] = Field(default_factory=list)
    cpu_utilization_ratio: float | None = Field(default=None, ge=0, le=1)  # the whole machine, since the last sample
    ram_used_bytes: int | None = Field(default=None, ge=0)
    ram_total_bytes: int | None = Field(default=None, ge=0)


class Histogram(_Model):
    """Observations per bucket of `HISTOGRAM_BOUNDS_S` (not cumulative), plus one above the last bound."""

    counts: list[int] = Field(min_length=len(HISTOGRAM_BOUNDS_S) + 1, max_length=len(HISTOGRAM_BOUNDS_S) + 1)
    sum_s: float = 0.0

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

    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    prompt_tokens: int = Field(default=0, ge=0)
    tokens_generated: int = Field(default=0, ge=0)
    queue_wait: Histogram = Field(default_factory=Histogram.empty)  # admission to start
    time_to_first_token: Histogram = Field(default_factory=Histogram.empty)  # admission to first token
    latency: Histogram = Field(default_factory=Histogram.empty)  # admission to result


class Telemetry(_Model):
    """The sample a heartbeat carries."""

    sampled_at: float  # unix time, seconds
    machine: MachineSample = Field(default_factory=MachineSample)
    jobs: dict[str, ModelCounters] = Field(default_factory=dict)  # by model


class FailureRecord(_Model):
    """One failed job, as the recent-failures list keeps it."""

    at: float  # unix time, seconds
    request_id: str
    model: str
    worker_id: str
    code: str
    message: str
