"""What a result was computed on, in one line (results.json provenance, cv summaries, benchmarks).

``describe(device)`` names the GPU for a CUDA device, and for the CPU its model (``/proc/cpuinfo``), architecture
and the threads torch uses: two CPU results are comparable only on the same model and thread count.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` says, else ``"unknown CPU"``."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: torch.device | str = "cpu") -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device; ``"cpu (Intel(R) Xeon(R) Processor, x86_64, 2 threads)"``
    for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)"
