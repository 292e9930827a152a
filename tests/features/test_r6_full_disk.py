"""A disk that fills up under an HDF5 write: one line naming the file, no temporary left, no crash (round 6, E)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams, tile_slide

# RLIMIT_FSIZE makes every write past 8 KiB fail with EFBIG, as ENOSPC does on a full disk: inside the HDF5 library
# that was a RuntimeError traceback, h5py's "Exception ignored" tracebacks and a segmentation fault at exit (rc 139)
CHILD = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from gigaslide.errors import GigaslideError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    what, target = sys.argv[1], sys.argv[2]
    if what == "grid":
        from gigaslide.tiling.store import load_grid, save_grid
        grid = load_grid(sys.argv[3])
    else:
        from gigaslide.features import store
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    try:
        save_grid(grid, target) if what == "grid" else store.save(target, np.ones((100, 64), np.float32))
    except GigaslideError as e:
        print("ONE LINE:", e.one_line())
""")


@pytest.mark.parametrize("what", ["features", "grid"])
def test_hdf5_write_on_a_full_disk_is_one_line(tmp_path, what):
    args = []
    if what == "grid":
        slide = make_slide(tmp_path / "a.tiff", (2048, 1536), seed=1)
        tile_slide(slide, tmp_path / "tiled", TilingParams(mpp=0.5, tile_size=32, min_tissue=0.5))  # > 8 KiB of coords
        args = [str(tmp_path / "tiled" / "patches" / "a.h5")]
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", CHILD, what, str(out / "a.h5"), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-500:]  # was -11 / 139: a segmentation fault
    assert f"ONE LINE: {out / 'a.h5'}: cannot write (File too large)" in r.stdout
    assert "Traceback" not in r.stderr
    assert list(out.iterdir()) == []  # neither the file nor a temporary
