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


#: Where the machine's and the process's memory facts are read (tests point them at a made-up tree).
MEMINFO, PROC_CGROUP, CGROUP_ROOT = "/proc/meminfo", "/proc/self/cgroup", "/sys/fs/cgroup"
#: A cgroup v1 "limit" at least this large means no limit (the kernel writes 2**63 rounded down to a page).
_NO_LIMIT = 1 << 60


def _meminfo_available() -> int | None:
    try:
        with open(MEMINFO, "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2: no limit) or unreadable


def _inactive_file(stat_path: str, key: bytes) -> int:
    """Page cache the kernel reclaims before it kills: counted in a cgroup's usage, yet available."""
    try:
        with open(stat_path, "rb") as f:
            for line in f:
                name, _, value = line.partition(b" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup (and every cgroup above it) still allows: the smallest limit less usage
    (reclaimable page cache counted as free) along its path; None where no cgroup limits memory (or none is read).

    A SLURM job (``--mem``), a container (``docker --memory``) or a systemd slice is killed at its cgroup's limit,
    however much memory the machine has free."""
    try:
        with open(PROC_CGROUP, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    room = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":  # cgroup v2
            base, limit_file, usage_file, key = CGROUP_ROOT, "memory.max", "memory.current", b"inactive_file"
        elif "memory" in controllers.split(","):  # cgroup v1
            base, limit_file, usage_file, key = (f"{CGROUP_ROOT}/memory", "memory.limit_in_bytes",
                                                 "memory.usage_in_bytes", b"total_inactive_file")
        else:
            continue
        names = [n for n in path.split("/") if n]
        for i in range(len(names), -1, -1):  # the cgroup, then each one above it, up to the root of the mount
            d = "/".join([base, *names[:i]])
            limit = _read_int(f"{d}/{limit_file}")
            if limit is None or limit >= _NO_LIMIT:
                continue
            usage = _read_int(f"{d}/{usage_file}") or 0
            free = max(0, limit - usage + _inactive_file(f"{d}/memory.stat", key))
            room = free if room is None else min(room, free)
    return room


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now: ``MemAvailable`` of ``/proc/meminfo``, or less where the
    process's memory cgroup (a SLURM job, a container) leaves less; None where neither can be read."""
    avail, room = _meminfo_available(), _cgroup_room()
    if avail is None or room is None:
        return room if avail is None else avail
    return min(avail, room)


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
