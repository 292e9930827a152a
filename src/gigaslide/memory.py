"""Process memory on Linux / glibc: resident size, available memory, and the ``malloc`` settings the memory-bound stages use.

glibc serves large blocks from its heap once one of that size has been freed, and a small block that
outlives them can split a freed hole so that the next large block no longer fits there: a loop that
allocates and frees tens of MB per item while keeping a little per item grows by about one item per
item. :func:`malloc_trim` hands the free pages of such holes back to the OS; :func:`set_malloc_thresholds`
changes where ``malloc`` draws the line between its heap and fresh ``mmap``s. Everywhere else
(other platforms, other C libraries) these are no-ops that return False / None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only (musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


def rss_bytes() -> int | None:
    """Resident set size of this process now (``/proc/self/statm``), None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now (``MemAvailable`` of ``/proc/meminfo``), None where it
    cannot be read."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def malloc_trim() -> bool:
    """Return the free pages of ``malloc``'s heap (its top and its holes) to the OS. True if it ran."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Blocks of ``mmap_threshold`` bytes or more from fresh ``mmap``s (returned to the OS when freed; each page
    faulted in anew), heap tops above ``trim_threshold`` trimmed. Process-wide. True if both were set."""
    libc = _libc()
    if libc is None:
        return False
    cap = (1 << 31) - 1  # mallopt takes a C int
    return (bool(libc.mallopt(M_MMAP_THRESHOLD, min(int(mmap_threshold), cap)))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, min(int(trim_threshold), cap))))
