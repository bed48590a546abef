"""glibc's malloc set for a process that allocates the same large maps for every image.

glibc serves an allocation above its mmap threshold with fresh pages from the
kernel, and each page then faults on first touch. The threshold starts at
128 KiB and rises, up to 32 MiB, as mmapped blocks are freed. So whether a
conv's output map (3.2 MB for edge net 3's first block at 224) is mmapped
afresh every call, or reused from the heap, depends on the process's history.

Two ranks of one job, or one rank from run to run, landed in either regime.
Edge net 3's conv1_1 on 112 rows took 1.24 ms in one and 0.48 ms in the other.
The split pass took 21-23 ms, or 18.6 ms with fixed thresholds
(``mpiexec -n 2``, per-instruction timing).

:func:`keep_freed_maps` fixes both thresholds: blocks up to 32 MiB come from
the heap, and up to 128 MiB of freed heap stays with the process for reuse.
This is the regime the process reached anyway when it was lucky. A peak is
still a peak: freed memory is reused, not added.

It does nothing where ``mallopt`` is missing (not glibc).
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_maps", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 128 * 2**20

_applied = False


def keep_freed_maps() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); whether they were set."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
