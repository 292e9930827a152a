"""The thumbnail of a slide without a small enough level (non-pyramidal) is read band by band, never whole
(OpenSlide's get_thumbnail read the whole level: 1.7 GB for a 1024 px thumbnail of a 16384 x 12288 TIFF)."""

from __future__ import annotations

import numpy as np
import tifffile

import gigaslide.slides.slide as slide_mod
from gigaslide.slides import open_slide
from gigaslide.testing import tissue_fn


class _Recorder:
    """Wraps a slide handle; records the px of every read (get_thumbnail reads the whole level)."""

    def __init__(self, handle):  # noqa: ANN001
        self._h, self.reads = handle, []

    def read_region(self, loc, level, size):  # noqa: ANN001, ANN201
        self.reads.append(size[0] * size[1])
        return self._h.read_region(loc, level, size)

    def get_thumbnail(self, size):  # noqa: ANN001, ANN201
        self.reads.append(self._h.level_dimensions[-1][0] * self._h.level_dimensions[-1][1])
        return self._h.get_thumbnail(size)

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self._h, name)


def test_single_level_thumbnail_read_in_bands(tmp_path, monkeypatch):
    W, H = 2000, 1500
    rgb = tissue_fn(W, H, seed=1)(0, 0, W, H, 1.0)
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, rgb, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.level_count == 1
        whole, ds_whole = s.thumbnail(250)  # 3 MP: read in one piece at the default limits
        monkeypatch.setattr(slide_mod, "THUMB_READ_PX", 1e6, raising=False)  # as if 3 MP were a large level
        monkeypatch.setattr(slide_mod, "THUMB_BAND_PX", 2.5e5, raising=False)
        rec = _Recorder(s._handle)
        s._handle = rec
        banded, ds = s.thumbnail(250)
    f = 7  # the integer reduction: int(min(2000 / 250, 1500 / 188))
    assert rec.reads and max(rec.reads) <= 2.5e5 + W * f  # bands, never the whole 3 MP level
    assert banded.shape == whole.shape == (188, 250, 3) and ds == ds_whole
    assert np.array_equal(banded, whole)  # bands of whole multiples of f rows: the same box averages
