"""What the worker reports about its machine: GPUs (through nvidia-smi) or CPU cores and RAM."""

from __future__ import annotations

import shutil
import subprocess

import psutil

from gputorrent.protocol import GPUInfo, Hardware


def detect_hardware() -> Hardware:
    return Hardware(
        gpus=_nvidia_gpus(), cpu_cores=psutil.cpu_count(logical=True), ram_total_bytes=psutil.virtual_memory().total
    )


def gpu_free_memory() -> list[tuple[str, int]]:
    """Each NVIDIA GPU's name and free memory now (bytes); empty without nvidia-smi."""
    rows = _nvidia_smi("name,memory.free")
    return [(name, int(free) * 1024 * 1024) for name, free in rows if free.isdigit()]


def _nvidia_smi(fields: str) -> list[tuple[str, str]]:
    """`nvidia-smi --query-gpu=FIELDS` as (name, last field) rows; empty without it."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        name, _, value = line.rpartition(",")
        if name.strip():
            rows.append((name.strip(), value.strip()))
    return rows


def _nvidia_gpus() -> list[GPUInfo]:
    return [
        GPUInfo(name=name, memory_total_bytes=int(mib) * 1024 * 1024 if mib.isdigit() else None)
        for name, mib in _nvidia_smi("name,memory.total")
    ]
