"""Two processes tiling one slide into one folder: the second waits for the first instead of deleting its live
temporaries (it removed them as a killed run's, and the first failed with FileNotFoundError)."""

from __future__ import annotations

import threading
import time

from gigaslide.locks import exclusive_file
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams, tile_slide


def test_a_slide_another_process_is_tiling_is_waited_for_and_its_temporaries_kept(tmp_path):
    slide = make_slide(tmp_path / "s0.tiff", (1024, 768), mpp=0.5)
    out = tmp_path / "out"
    live = out / "patches" / ".tmp-s0.h5.live1234.h5"  # the other process's grid, being written
    live.parent.mkdir(parents=True)
    live.write_bytes(b"")
    done = threading.Event()
    result = {}
    with exclusive_file(out / "locks" / "tile" / "s0.lock"):  # held by "the other process"
        t = threading.Thread(target=lambda: (result.setdefault("grid", tile_slide(slide, out, TilingParams(0.5, 224))),
                                             done.set()))
        t.start()
        time.sleep(1.0)
        assert not done.is_set() and live.exists()  # waited; the live temporary left alone
        live.unlink()  # the other process renamed its temporary... and then died before writing the grid
    t.join(60)
    assert done.is_set() and len(result["grid"]) > 0
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["s0.h5"]
    assert not any((out / "locks" / "tile").iterdir())  # the lock file is removed when released


def test_exclusive_file_serialises_and_leaves_no_file(tmp_path):
    path = tmp_path / "l" / "x.lock"
    order = []

    def worker(i):
        with exclusive_file(path):
            order.append(("in", i))
            time.sleep(0.05)
            order.append(("out", i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(order) == 8 and all(order[k][0] == "in" and order[k + 1] == ("out", order[k][1])
                                   for k in range(0, 8, 2))
    assert not path.exists()


def test_a_grayscale_slide_without_detected_tissue_says_why(tmp_path):
    import numpy as np
    import pytest

    from gigaslide.errors import GigaslideError
    from gigaslide.slides.writer import write_pyramidal_tiff

    def gray(x0, y0, w, h, ds):  # noqa: ANN001, ANN202 - dark gray blobs on light gray: contrast, no colour
        yy, xx = np.mgrid[y0:y0 + h * ds:ds, x0:x0 + w * ds:ds]
        v = np.where((xx - 500) ** 2 + (yy - 400) ** 2 < 250 ** 2, 90, 235).astype(np.uint8)
        return np.repeat(v[..., None], 3, -1)

    path = write_pyramidal_tiff(tmp_path / "g.tiff", 1024, 768, gray, mpp=0.5, compression="zlib")
    with pytest.raises(GigaslideError, match="grayscale slide") as e:
        tile_slide(path, tmp_path / "out", TilingParams(0.5, 224))
    assert "--tissue-from" in str(e.value) and "not blank" not in str(e.value)


def test_deleted_overlay_pictures_are_made_again_on_a_re_run(tmp_path):
    slide = make_slide(tmp_path / "s0.tiff", (1024, 768), mpp=0.5)
    out = tmp_path / "out"
    tile_slide(slide, out, TilingParams(0.5, 224))
    pngs = [out / "tissue" / "s0.png", out / "grid" / "s0.png"]
    before = [p.read_bytes() for p in pngs]
    for p in pngs:
        p.unlink()
    tile_slide(slide, out, TilingParams(0.5, 224))  # the grid is reused; its pictures are drawn again
    assert [p.read_bytes() for p in pngs] == before
