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


def _nvidia_gpus() -> list[GPUInfo]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, memory_mib = line.rpartition(",")
        if name.strip():
            mib = memory_mib.strip()
            gpus.append(
                GPUInfo(name=name.strip(), memory_total_bytes=int(mib) * 1024 * 1024 if mib.isdigit() else None)
            )
    return gpus
