"""Process memory: figures for run reports and benchmarks, and the allocator settings of a run."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused once freed. glibc's default hands every
# block over 32 MB (sooner at first) to its own mapping, returned to the system when freed: the next
# block of that size then faults every one of its pages in again. The engine frees and allocates
# blocks of (queries x 112 rows x chunk width) floats for each crop row, 44 MB with 48 queries.
HEAP_BLOCK_LIMIT = 256 * 2**20
# Freed memory at the heap's top is kept up to this much while a run lasts (returned at its end).
HEAP_KEEP_LIMIT = 1024 * 2**20
# The engine's threads allocate from heaps of their own (64 MB each), which glibc unmaps as soon as one
# is empty unless this much room is to be kept: the polygon thread's next strip then faulted its pages
# in again. Also what the main heap grows by at a time (address space, not memory, until used).
HEAP_TOP_PAD = 64 * 2**20


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """Within, freed blocks up to HEAP_BLOCK_LIMIT are reused instead of returned to the system and
    faulted in again page by page; at the end, the free memory goes back to the system (glibc only;
    elsewhere nothing changes). The settings stay for the process: they only decide where blocks
    come from, and every run that uses them gives its memory back when it ends."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_LIMIT)
        libc.mallopt(_M_TOP_PAD, HEAP_TOP_PAD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter survives exec on Linux,
    so a child would inherit the parent's high-water mark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        return _windows_peak_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def _windows_peak_mb() -> float:
    """Peak working set (psutil's `peak_wset` on Windows); 0 where no figure is to be had."""
    try:
        import psutil

        return float(getattr(psutil.Process().memory_info(), "peak_wset", 0)) / 2**20
    except Exception:  # a figure for reports only
        return 0.0
