"""gigaslide.memory: resident size and glibc's malloc controls."""

import subprocess
import sys

import numpy as np
import pytest

from gigaslide import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")


@linux
def test_resident_size_follows_memory_that_is_touched_and_released():
    before = memory.rss_bytes()
    a = np.ones(64 << 20, np.uint8)  # 64 MB, every page written
    during = memory.rss_bytes()
    del a
    after = memory.rss_bytes()
    assert during - before > 60 << 20
    assert during - after > 60 << 20  # a block this large is its own mapping: gone when freed


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


@linux
def test_malloc_trim_returns_a_heap_hole_to_the_os():
    # in its own process: malloc settings are process-wide
    out = subprocess.run([sys.executable, "-c", _TRIM], capture_output=True, text=True, check=True).stdout
    assert int(out) > 64 << 20
