"""The user's environment (review round 6, lens E): tiling where worker processes cannot start."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams, tile_slide
from gigaslide.tiling import parallel
from gigaslide.tiling.parallel import tile_many

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)


def test_full_dev_shm_tiles_in_this_process_with_one_warning(tmp_path, monkeypatch):
    """multiprocessing's semaphores live in /dev/shm: a full one (a container's 64 MB used up by data loaders) made
    the pool's constructor raise ENOSPC, which `gigaslide tile` reported as "free disk space ... or another --out"."""
    slides = [make_slide(tmp_path / f"s{i}.tiff", (512, 512), seed=i) for i in range(3)]

    def no_semaphores(*a, **k):  # what ProcessPoolExecutor raises from SemLock when /dev/shm is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", no_semaphores)
    with pytest.warns(UserWarning, match="cannot start 2 tiling processes .*/dev/shm") as rec:
        out = {p.name: (g, err) for p, g, err in tile_many(slides, str, tmp_path / "out", PARAMS, workers=2)}
    assert len(rec) == 1
    assert sorted(out) == ["s0.tiff", "s1.tiff", "s2.tiff"]
    for p in slides:
        g, err = out[p.name]
        assert err is None and np.array_equal(g.coords, tile_slide(p, tmp_path / "here", PARAMS).coords)
