"""Review round 8 (mutation testing): thumbnails against the stored pyramid levels read with tifffile -- which
level, which level-0 location each band is read from, the scale returned -- and the same pixels as PIL's RGBA path."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

import gigaslide.slides.slide as slide_mod
from gigaslide.slides import open_slide
from gigaslide.slides.writer import write_array_as_slide

from .test_r8_reads import _box, _random
from .test_thumbnail_banded import _Recorder


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """1024 x 768 px of texture, uncompressed, levels at downsample 1, 2, 4; (path, level 2 read with tifffile)."""
    p = write_array_as_slide(tmp_path_factory.mktemp("thumb") / "p.tiff", _random(768, 1024, 7), mpp=0.5,
                             compression="none", min_level_size=256)
    with tifffile.TiffFile(p) as tif:
        level2 = tif.pages[2].asarray()
    assert level2.shape == (192, 256, 3)
    return p, level2


def test_a_thumbnail_is_read_from_the_coarsest_level_fine_enough(pyramid):
    """256 px wide is level 2 itself (downsample 4): one read of its 256 x 192 px, its pixels unchanged; 128 px wide is
    level 2 box-averaged by 2 (not level 0 by 8, nor level 1 by 4: their rounded means differ from the stored ones)."""
    p, level2 = pyramid
    with open_slide(p) as s:
        rec = _Recorder(s._handle)
        s._handle = rec
        thumb, scale = s.thumbnail(256)
        assert rec.reads == [256 * 192] and scale == 4.0
        np.testing.assert_array_equal(thumb, level2)
        thumb, scale = s.thumbnail(128)
        assert rec.reads[1:] == [256 * 192] and scale == 8.0
        np.testing.assert_array_equal(thumb, _box(level2, 2))


@pytest.mark.parametrize("size,want", [(256, lambda lv: lv), (128, lambda lv: _box(lv, 2))])
def test_a_level_read_in_bands_is_read_at_its_level0_location(pyramid, monkeypatch, size, want):
    """Level 2 read in bands (a limit of 1e4 px read at once, bands of 5e3 px): each band's location is level-0 px
    (the band's level row x 4), so the bands tile the level exactly as the stored level is."""
    p, level2 = pyramid
    with open_slide(p) as s:
        monkeypatch.setattr(slide_mod, "THUMB_READ_PX", 1e4)
        monkeypatch.setattr(slide_mod, "THUMB_BAND_PX", 5e3)
        rec = _Recorder(s._handle)
        s._handle = rec
        thumb, _ = s.thumbnail(size)
    assert len(rec.reads) > 5 and max(rec.reads) <= 5e3
    np.testing.assert_array_equal(thumb, want(level2))


def test_the_scale_returned_is_level0_px_per_thumbnail_px_across(tmp_path):
    """A portrait slide 751 x 1000 px at 100 px: 75 x 100 px, and 751 / 75 = 10.013 level-0 px per px across (the
    scale heatmaps paint with), not the 10.0 of the longer side."""
    p = write_array_as_slide(tmp_path / "portrait.tiff", _random(1000, 751, 8), mpp=0.5, compression="none")
    with open_slide(p) as s:
        thumb, scale = s.thumbnail(100)
    assert thumb.shape == (100, 75, 3)
    assert scale == pytest.approx(751 / 75, rel=1e-12)


def test_thumbnails_are_the_pixels_of_pils_rgba_reduce_and_resize(pyramid):
    """An opaque level is reduced and resized as RGB (faster, lens W of round 8): the same pixels as PIL's RGBA path
    (premultiplied alpha, then put on white), for an integer and a fractional reduction."""
    p, _ = pyramid
    with open_slide(p) as s:
        for size in (100, 37, 300):
            thumb, _ = s.thumbnail(size)
            W, H = s.dimensions
            ds = max(W, H) / size
            tw, th = round(W / ds), round(H / ds)
            level = max(i for i, d in enumerate(s.level_downsamples) if d <= ds * (1 + 1e-3))
            img = s._handle.read_region((0, 0), level, s.level_dimensions[level])
            assert img.mode == "RGBA"
            f = int(min(img.size[0] / tw, img.size[1] / th))
            if f >= 2:
                img = img.reduce(f)
            img = img.resize((tw, th), Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(thumb, np.asarray(img.convert("RGB")))
