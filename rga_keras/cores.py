"""How many CPU cores this process may use, for the thread pools of the input pipelines and the runtimes."""
from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores() -> int:
    """The CPU cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    ``--cpus``), which ``os.cpu_count()`` and TensorFlow's own count both ignore."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
