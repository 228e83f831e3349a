"""`gputorrent status`: the pool in the terminal, once or refreshed in place (`--watch`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

import httpx

from gputorrent.coordinator.pool_view import PoolOverview
from gputorrent.protocol import WorkerState

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, then erase: the next frame replaces the last in place
GIB = 1024**3


def fetch(url: str, api_key: str | None, timeout_s: float = 10.0) -> PoolOverview:
    """`GET /pool` with the last minute of history.

    Raises:
        RuntimeError: the coordinator is unreachable or refused (the message says which and why).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/pool", params={"history_s": 60}, headers=headers, timeout=timeout_s)
    except httpx.TransportError as e:
        raise RuntimeError(f"cannot reach the coordinator at {url}: {e}") from None
    if response.status_code != 200:
        try:
            error = response.json()["error"]
            reason = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {response.status_code}"
        hint = " (set GPUTORRENT_API_KEY to a client or admin key)" if response.status_code == 401 else ""
        raise RuntimeError(reason + hint)
    return PoolOverview.model_validate_json(response.content)


def render(pool: PoolOverview, url: str) -> str:
    """The pool as a few lines of text: totals, the last minute's rates, workers, queues by model."""
    t, r = pool.totals, pool.rates
    registered = sum(t.workers.values())  # `pool.workers` holds only some rows of a large pool
    ttft = f"{r.ttft_avg_s * 1000:.0f} ms" if r.ttft_avg_s is not None else "-"
    lines = [
        f"GPU Torrent at {url}   {time.strftime('%H:%M:%S', time.localtime(pool.at))}",
        f"workers: {t.workers['alive']} alive of {registered}"
        + "".join(f", {n} {state}" for state, n in t.workers.items() if n and state != "alive")
        + f" | slots busy {t.slots_busy}/{t.slots} | in flight {t.in_flight} | queued {t.queued}",
        f"last {r.window_s} s: {r.jobs_per_s:.2f} requests/s | {r.tokens_per_s:.1f} tokens/s | "
        f"first token {ttft} | {r.failed_per_s:.2f} errors/s",
        "",
    ]
    rows = [("WORKER", "STATE", "BACKEND", "MODELS", "BUSY", "QUEUED", "MACHINE", "LAST BEAT")]
    for w in pool.workers:
        beat = f"{max(0.0, pool.at - w.last_heartbeat_at):.1f} s ago" if w.last_heartbeat_at else "-"
        rows.append((w.worker_id, w.state, w.backend, ",".join(w.models), f"{w.jobs_in_flight}/{w.slots}",
                     str(w.queue_length), _machine(w), beat))  # fmt: skip
    lines += _table(rows)
    for w in pool.workers:
        if w.state_reason:
            lines.append(f"  {w.worker_id}: {w.state_reason}")
    if not pool.workers:
        lines.append("(no workers registered)")
    elif len(pool.workers) < registered:
        lines.append(f"({len(pool.workers)} of {registered} workers shown: those not alive first, then the busiest)")
    lines.append("")
    lines += _table(
        [("MODEL", "WORKERS", "ALIVE", "QUEUED", "IN FLIGHT")]
        + [(m.model, str(m.workers), str(m.live_workers), str(m.queued), str(m.in_flight)) for m in pool.models]
    )
    return "\n".join(lines)


def _machine(w: WorkerState) -> str:
    machine = w.telemetry.machine if w.telemetry else None
    if machine is None:
        return ", ".join(g.name for g in w.hardware.gpus) or f"{w.hardware.cpu_cores or '?'} CPU cores"
    if machine.gpus:
        parts = []
        for g in machine.gpus:
            part = g.name
            if g.memory_used_bytes is not None and g.memory_total_bytes:
                part += f" {g.memory_used_bytes / GIB:.1f}/{g.memory_total_bytes / GIB:.0f} GiB"
            if g.utilization_ratio is not None:
                part += f" {g.utilization_ratio:.0%}"
            if g.temperature_celsius is not None:
                part += f" {g.temperature_celsius:.0f}C"
            parts.append(part)
        return "; ".join(parts)
    cpu = f"CPU {machine.cpu_utilization_ratio:.0%}" if machine.cpu_utilization_ratio is not None else "CPU ?"
    if machine.ram_used_bytes is not None and machine.ram_total_bytes:
        return f"{cpu} RAM {machine.ram_used_bytes / GIB:.1f}/{machine.ram_total_bytes / GIB:.0f} GiB"
    return cpu


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def run(url: str, api_key: str | None, *, watch: bool, interval_s: float, out: TextIO = sys.stdout) -> int:
    """Print the pool once (1 when it cannot be read), or redraw it every `interval_s` until Ctrl-C."""
    if not watch:
        try:
            print(render(fetch(url, api_key), url), file=out)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        while True:
            try:
                frame = render(fetch(url, api_key), url)
            except RuntimeError as e:  # keep watching: the coordinator may come back
                frame = f"GPU Torrent at {url}   {time.strftime('%H:%M:%S')}\nerror: {e}"
            out.write(f"{CLEAR_SCREEN}{frame}\n(refreshing every {interval_s:g} s; Ctrl-C to stop)\n")
            out.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        out.write("\n")
        return 0
