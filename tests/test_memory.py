"""gigaslide.memory: resident size and glibc's malloc controls (each check in a fresh process: malloc settings
are process-wide, and other tests change them)."""

import subprocess
import sys

import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")

_RSS = """
import numpy as np
from gigaslide import memory
before = memory.rss_bytes()
a = np.ones(64 << 20, np.uint8)  # 64 MB, every page written: its own mapping at glibc's default threshold
during = memory.rss_bytes()
del a
print(during - before, during - memory.rss_bytes())
"""

_TRIM = """
import numpy as np
from gigaslide import memory
assert memory.set_malloc_thresholds(256 << 20, 1 << 30)  # 32 MB blocks from the heap, not trimmed by free()
big = [np.ones(32 << 20, np.uint8) for _ in range(3)]
pin = np.ones(1 << 12, np.uint8)  # a small block after them keeps the heap top from shrinking
del big
held = memory.rss_bytes()
assert memory.malloc_trim()
print(held - memory.rss_bytes())
"""


def _run(code: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [int(v) for v in out.split()]


@linux
def test_resident_size_follows_memory_that_is_touched_and_released():
    grew, released = _run(_RSS)
    assert grew > 60 << 20 and released > 60 << 20


@linux
def test_malloc_trim_returns_a_heap_hole_to_the_os():
    (released,) = _run(_TRIM)
    assert released > 64 << 20
