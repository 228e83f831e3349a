"""B12, a Prometheus scrape of a large pool: what `GET /metrics` costs the coordinator as workers grow.

The coordinator writes the pool's series from its snapshot at each scrape
(`coordinator/metrics.py`). This measures that writing alone, in process, on hand-built worker
states like a busy pool's: each worker alive with one GPU, serving one model, its heartbeat
carrying job counters and the three latency histograms. For 100, 1,000 and 10,000 workers, with
the per-worker series (`GET /metrics`, the default) and without them (`?per_worker=false`): the
coordinator's time per scrape (the median of `ROUNDS`, each after one scrape that sets the pool
totals' starting point), the size of the text and its number of samples. The snapshot's own read
is not in it (docs/scaling.md measures that).

    bench/.venv/bin/python bench/metrics_scrape.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from pool import save_plot, write_result
from prometheus_client import CollectorRegistry

from gputorrent.coordinator.metrics import PoolTotals, exposition
from gputorrent.protocol import Hardware, WorkerState
from gputorrent.telemetry import GPUSample, Histogram, MachineSample, ModelCounters, Telemetry

SIZES = (100, 1000, 10000)
ROUNDS = 3
IMAGES = Path(__file__).parent.parent / "docs" / "images"


def busy_pool(count: int) -> list[WorkerState]:
    latencies = Histogram.empty()
    for seconds in (0.05, 0.3, 0.3, 1.2, 4.0, 12.0):
        latencies = latencies.observe(seconds)
    counters = ModelCounters(completed=120, failed=2, prompt_tokens=50_000, tokens_generated=90_000,
                             queue_wait=latencies, time_to_first_token=latencies, latency=latencies)  # fmt: skip
    gpu = GPUSample(index=0, name="NVIDIA H100 80GB HBM3", memory_used_bytes=60 * 2**30, memory_total_bytes=80 * 2**30,
                    utilization_ratio=0.8, temperature_celsius=64.0)  # fmt: skip
    machine = MachineSample(gpus=[gpu], cpu_utilization_ratio=0.3, ram_used_bytes=40 * 2**30, ram_total_bytes=2**38)
    telemetry = Telemetry(sampled_at=time.time(), machine=machine, jobs={"llama3.1:8b": counters})
    row = WorkerState(
        worker_id="-", models=["llama3.1:8b"], backend="ollama", slots=4, hardware=Hardware(), state="alive",
        jobs_in_flight=2, queue_length=1, last_heartbeat_at=time.time(), registered_at=0.0, telemetry=telemetry,
    )  # fmt: skip
    return [row.model_copy(update={"worker_id": f"gpu-{i:05d}"}) for i in range(count)]


def measure(count: int, per_worker: bool) -> dict[str, Any]:
    workers = busy_pool(count)
    totals = PoolTotals()
    exposition(CollectorRegistry(), workers, totals, per_worker=per_worker)  # the totals' starting point
    times_s, body = [], b""
    for _ in range(ROUNDS):
        started = time.perf_counter()
        body = exposition(CollectorRegistry(), workers, totals, per_worker=per_worker)
        times_s.append(time.perf_counter() - started)
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {"workers": count, "per_worker": per_worker, "ms": statistics.median(times_s) * 1000,
            "bytes": len(body), "samples": samples}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    rows = [
        "| workers | series | coordinator ms a scrape | text | samples |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["scrapes"]:
        size = f"{r['bytes'] / 2**20:.1f} MiB" if r["bytes"] >= 2**20 else f"{r['bytes'] / 2**10:.1f} KiB"
        series = "per worker (default)" if r["per_worker"] else "`per_worker=false`"
        rows.append(f"| {r['workers']:,} | {series} | {r['ms']:,.1f} | {size} | {r['samples']:,} |")
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for per_worker, label, style in ((True, "per worker (default)", "o-"), (False, "per_worker=false", "s--")):
        rows = [r for r in result["scrapes"] if r["per_worker"] is per_worker]
        ax.plot([r["workers"] for r in rows], [r["ms"] for r in rows], style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="workers", ylabel="coordinator ms a scrape", title="GET /metrics")
    ax.legend()
    save_plot(fig, out)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()
    result = {"scrapes": [measure(count, per_worker) for count in args.sizes for per_worker in (True, False)]}
    write_result("metrics_scrape", result)
    plot(result, IMAGES / "bench-metrics_scrape.png")
    print(table(result))


if __name__ == "__main__":
    main()
