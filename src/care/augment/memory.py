"""Opt-in glibc malloc tuning for CPU training.

PyTorch's CPU allocator is plain ``malloc``. With glibc's defaults, the megabyte-sized
temporaries of a batched augmentation are handed back to the OS after every batch (``munmap``
or heap trimming) and page-faulted in again on the next one: on a 2-core machine that is about a
third of the time of a 256-image 32x32x3 batch. Raising the mmap threshold is not enough for
activations above glibc's 32 MiB ceiling: a ResNet-18 step at 32 px with 4 views maps and unmaps
them every step (660k minor page faults, over a quarter of its time on 2 cores; compare
`benchmarks/throughput.py --no-tune-malloc`). :func:`tune_malloc`
therefore serves every allocation from the heap and stops trimming it, so freed memory is reused.
It changes the whole process, so it is never called implicitly; an entry point (CLI, benchmark)
may call it once. The ``MALLOC_MMAP_MAX_=0`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables,
jemalloc or tcmalloc have the same effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_malloc(trim_threshold: int = 2**30) -> bool:
    """Serve every allocation from the heap and trim it only past ``trim_threshold`` free bytes.

    Returns True when glibc accepted the settings, False elsewhere (non-Linux, musl, ...).
    The process then keeps up to its peak heap usage instead of returning it to the OS.
    glibc still falls back to ``mmap`` when the heap cannot grow.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_MAX, 0) == 1  # no mmap'd blocks: the mmap threshold never applies
    ok_trim = mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
    return ok_mmap and ok_trim
