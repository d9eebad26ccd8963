"""Keep freed host memory mapped in training processes (glibc's malloc on Linux).

A CPU training step allocates and frees the same few GB of activations and gradients every step. glibc serves
blocks above its mmap threshold (at most 32 MB) with fresh mmaps and returns the top of the heap to the kernel
when it is freed, so each step touches new pages: every 4 KB page costs a page fault and a zero-fill. Measured on
this project's 2-vCPU VM (benchmarks/results/2026-11-28-train.md): 0.5 million faults (1.9-2.6 GB) per step of a
4-layer 0.3B model at 4 x 512 tokens, ~10% of the step. With mmap off and no trimming, the heap keeps its peak
size and a step after the first faults nothing: the resident memory stays at the peak, as with the CUDA caching
allocator. `ernie45 train` applies it at start; `ERNIE45_RETAIN_HOST_MEMORY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (glibc only). Returns whether it was applied."""
    if os.environ.get("ERNIE45_RETAIN_HOST_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not applied:
        logger.warning("mallopt refused to keep freed host memory; training runs with the default malloc policy")
    return applied
