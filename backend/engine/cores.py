"""How many CPU cores this process may use, without importing torch (vectorize.py sizes its threads by it)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity where the system has one (a container or
    `taskset` can allow fewer than the machine has), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
