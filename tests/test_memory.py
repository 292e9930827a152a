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


def _tree(tmp_path, meminfo_kb: int, cgroup: str, files: dict[str, str]):  # noqa: ANN001, ANN202
    (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kb} kB\n")
    (tmp_path / "cgroup").write_text(cgroup)
    for rel, text in files.items():
        f = tmp_path / "sys" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp_path / "meminfo"), str(tmp_path / "cgroup"), str(tmp_path / "sys")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_memory_is_what_the_processs_cgroup_leaves(tmp_path, monkeypatch, version):
    """A SLURM job or container is killed at its memory cgroup's limit, whatever the machine has free: 20 GB free on
    the machine, a 4 GB job limit with 3 GB used (0.5 GB of it reclaimable page cache) leaves 1.5 GB (it said 20 GB,
    and ``--bag-memory auto`` took half of that: measured in a 1 GiB cgroup v1 here, 23.4 GB and 11.7 GB)."""
    from gigaslide import memory

    gb = 1 << 30
    if version == "v2":
        paths = _tree(tmp_path, 20 * gb // 1024, "0::/slurm/job_7/step_0\n", {
            "slurm/memory.max": "max\n", "slurm/job_7/memory.max": f"{4 * gb}\n",
            "slurm/job_7/memory.current": f"{3 * gb}\n",
            "slurm/job_7/memory.stat": f"anon 1\ninactive_file {gb // 2}\n",
            "slurm/job_7/step_0/memory.max": "max\n", "slurm/job_7/step_0/memory.current": f"{3 * gb}\n"})
    else:
        paths = _tree(tmp_path, 20 * gb // 1024, "5:cpu,cpuacct:/x\n4:memory:/slurm/uid_1/job_7\n", {
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/slurm/uid_1/job_7/memory.limit_in_bytes": f"{4 * gb}\n",
            "memory/slurm/uid_1/job_7/memory.usage_in_bytes": f"{3 * gb}\n",
            "memory/slurm/uid_1/job_7/memory.stat": f"cache 9\ntotal_inactive_file {gb // 2}\n"})
    monkeypatch.setattr(memory, "MEMINFO", paths[0])
    monkeypatch.setattr(memory, "PROC_CGROUP", paths[1])
    monkeypatch.setattr(memory, "CGROUP_ROOT", paths[2])
    assert memory.available_memory() == gb + gb // 2


def test_without_a_cgroup_limit_available_memory_is_the_machines(tmp_path, monkeypatch):
    from gigaslide import memory

    paths = _tree(tmp_path, 1000, "0::/user.slice\n", {"user.slice/memory.max": "max\n"})
    monkeypatch.setattr(memory, "MEMINFO", paths[0])
    monkeypatch.setattr(memory, "PROC_CGROUP", paths[1])
    monkeypatch.setattr(memory, "CGROUP_ROOT", paths[2])
    assert memory.available_memory() == 1000 * 1024
