"""Tiling many slides at once: the same files as one after another, a broken slide or a dead worker stops nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gigaslide.testing import make_slide, pid_alive
from gigaslide.tiling import TilingParams, load_grid, tile_slide
from gigaslide.tiling import parallel
from gigaslide.tiling.parallel import tile_many, tiling_workers

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    good = [make_slide(d / f"s{i}.tiff", (1024, 768), seed=i) for i in range(4)]
    broken = d / "broken.tiff"
    broken.write_bytes(b"not a slide")
    return good, broken


def test_worker_processes_write_what_one_process_writes(slides, tmp_path):
    good, broken = slides
    items = [*good[:2], broken, *good[2:]]
    out = {p.name: (g, err) for p, g, err in tile_many(items, str, tmp_path / "pool", PARAMS, workers=2)}
    assert sorted(out) == sorted(p.name for p in items)  # every slide answered once
    assert out["broken.tiff"][0] is None and "broken.tiff" in out["broken.tiff"][1]  # one line naming the file
    for p in good:
        here = tile_slide(p, tmp_path / "here", PARAMS)
        g, err = out[p.name]
        assert err is None and len(g) > 0
        assert np.array_equal(g.coords, here.coords) and np.array_equal(g.tissue, here.tissue)
        back = load_grid(tmp_path / "pool" / "patches" / f"{p.stem}.h5")
        assert np.array_equal(back.coords, here.coords)
        for sub, ext in (("tissue", "png"), ("tissue", "geojson"), ("grid", "png")):
            assert (tmp_path / "pool" / sub / f"{p.stem}.{ext}").read_bytes() == (tmp_path / "here" / sub / f"{p.stem}.{ext}").read_bytes()
    assert not list((tmp_path / "pool").rglob(".tmp-*"))


def test_a_worker_that_dies_leaves_its_slides_to_the_calling_process(slides, tmp_path, monkeypatch):
    good, _ = slides
    parent = os.getpid()
    real = parallel.tile_slide

    def crash_in_a_worker(path, out, params, **kw):  # noqa: ANN001, ANN003, ANN202
        if os.getpid() != parent and str(path).endswith("s1.tiff"):
            os._exit(11)  # as a segfault inside a C reader would
        return real(path, out, params, **kw)

    monkeypatch.setattr(parallel, "tile_slide", crash_in_a_worker)
    got = {p.name: (g, err) for p, g, err in tile_many(good, str, tmp_path, PARAMS, workers=2)}
    assert sorted(got) == sorted(p.name for p in good)
    assert all(err is None and len(g) > 0 for g, err in got.values())


def test_items_are_drawn_lazily_a_bounded_window_ahead(slides, tmp_path):
    """The caller may lock each slide as it is drawn: at most 2 x workers slides are drawn and not yet answered."""
    good, _ = slides
    for workers in (1, 2):
        drawn, ahead = [], []

        def source():  # noqa: ANN202
            for p in good * 2:
                drawn.append(p)
                yield p

        for n, _ in enumerate(tile_many(source(), str, tmp_path / str(workers), PARAMS, workers=workers), start=1):
            ahead.append(len(drawn) - n)
        assert len(drawn) == 8 and max(ahead) <= (0 if workers == 1 else 2 * workers - 1)


def test_tiling_workers_is_one_per_slide_at_most_and_shares_cores_between_ranks():
    cores = len(os.sched_getaffinity(0))
    assert tiling_workers(1) == 1 and tiling_workers(1000) == cores
    assert tiling_workers(1000, ranks_per_node=cores) == 1


_KILLED_PARENT = """
import sys, time
from gigaslide.tiling import TilingParams
from gigaslide.tiling.parallel import tile_many

def items():
    yield from sys.argv[2:]
    print("READY", flush=True)  # both workers started and given a slide: now idle, waiting for the next one
    time.sleep(600)

for _ in tile_many(items(), str, sys.argv[1], TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5), workers=2):
    pass
"""


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the worker processes")
def test_workers_exit_when_the_process_tiling_is_killed(slides, tmp_path):
    """kill -9 of the process running tile_many: its worker processes exit too (they waited forever on their task
    queue, holding memory and the parent's stdout: `gigaslide tile ... | tee log` never ended)."""
    import signal
    import subprocess
    import sys
    import time

    good, _ = slides
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, str(tmp_path / "o"), *map(str, good[:2])],
                            stdout=subprocess.PIPE, text=True, env=env)
    workers: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "READY"
        workers = _children(proc.pid)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # a generous bound on an event, not a speed check
        while time.monotonic() < deadline and any(pid_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if pid_alive(w)]
    finally:
        for w in workers:  # on the old code: the orphans this test made
            if pid_alive(w):
                os.kill(w, signal.SIGKILL)
        proc.kill()
