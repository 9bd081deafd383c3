"""The machine a measurement ran on, recorded beside every figure (reports and benchmarks)."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what platform says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU, cores, GPU and the versions that change the numbers.

    ``cpu_cores`` counts the cores this process may use (a container or taskset may allow
    fewer than the machine's ``cpu_count``); ``gpu`` is None without CUDA.
    """
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
