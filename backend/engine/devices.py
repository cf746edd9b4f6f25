"""Which torch device a run uses: 'auto' or a device the user named, checked to be usable here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from backend.engine.errors import InputError


def usable_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity where the system has one (a container or
    `taskset` can allow fewer than the machine has), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be usable here."""
    if isinstance(device, torch.device):
        return device
    name = (device or "cpu").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"Unknown device {device!r}. Use auto, cpu, cuda or mps.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was requested but no CUDA GPU is usable here. Use --device cpu.")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         "GPU(s), numbered from 0.")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("Device 'mps' was requested but Apple MPS is not available. Use --device cpu.")
    return dev


def set_intra_op_threads(threads: int) -> int:
    """From now on, torch ops called from this thread use `threads` threads each; returns the count before.

    torch keeps the count per calling thread (OpenMP's); a thread new to torch first takes the value last
    set anywhere, which `get_num_threads` makes happen before the count is set here, not after.
    """
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    return before


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Within, torch ops called from this thread use `threads` threads each; the count before is restored."""
    before = set_intra_op_threads(threads)
    try:
        yield
    finally:
        set_intra_op_threads(before)
