"""glibc malloc settings for tensor work on CPU: keep freed memory instead of page-faulting it back.

PyTorch allocates CPU tensors with the C library's malloc. glibc serves large blocks with fresh
``mmap`` pages and returns freed memory at the top of the heap to the OS once more than a threshold
is free, so a workload that allocates and frees the same few MB on every call (a filter's forward
and backward over long sequences) faults every page back in, zeroed, on the next call: on the
benchmark machine about 3 us per 4 KiB page, up to a third of a training step's filter time.
:func:`tune_malloc` raises both thresholds, which is what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do when set before the process starts. ``train.py`` calls it; call it
yourself at the start of your own scripts (it changes the whole process, so the library never does).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's maximum on 64-bit)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before it goes back to the OS
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` bytes
    of freed heap memory (glibc ``mallopt``) for the rest of the process.

    Returns whether the settings were applied: False where the C library is not glibc, or where the
    environment already sets ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (your setting wins).
    The cost is memory: the process keeps what it freed (up to ``trim_threshold``) instead of returning it.
    """
    if not 0 < mmap_threshold <= MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD}] bytes (glibc's limit), got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be positive, got {trim_threshold}")
    if any(name in os.environ for name in ENV_VARS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
