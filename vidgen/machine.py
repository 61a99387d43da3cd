"""What a measurement ran on, in one line, for the benchmarks' JSON.

Generated videos need not be bit-equal across CPU kinds or torch's CPU kernels (another
vector width sums in another order, and a 512-frame rollout amplifies the last bit of a
matmul), so a figure names the processor model, the kernel level torch dispatches to and
the threads it used, not only the OS.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` says."""
    with_info = Path("/proc/cpuinfo")
    try:
        for line in with_info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def describe_machine(device: str | torch.device = "cpu") -> str:
    """``'<cpu model> (<torch CPU capability>), N cpus, T torch threads, torch X, <OS>'``;
    on a CUDA device its name comes first."""
    device = torch.device(device)
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    cpu = cpu_model() + (f" ({capability})" if capability else "")
    parts = [
        cpu,
        f"{os.cpu_count()} cpus",
        f"{torch.get_num_threads()} torch threads",
        f"torch {torch.__version__}",
        platform.platform(),
    ]
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    return ", ".join(parts)
