"""Whole-slide canvases: the on-disk cache is read again when the scan it was read from changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gigaslide.streaming.data import cached_canvas, read_canvas
from gigaslide.testing import make_slide


def _same(a, b) -> bool:  # noqa: ANN001
    return a.origin == b.origin and a.content_size == b.content_size and a.slide_mpp == b.slide_mpp and np.array_equal(
        np.asarray(a.image), np.asarray(b.image))


def test_canvas_cache_is_read_again_for_a_new_slide_mpp_or_a_replaced_slide(tmp_path: Path) -> None:
    s, cache = tmp_path / "s.tif", tmp_path / "cache"
    make_slide(s, (1024, 768), mpp=0.5, seed=1, blobs=1)
    first = cached_canvas(s, cache, 2.0, 4096, 32)
    assert _same(first, read_canvas(s, 2.0, 4096, 32)) and isinstance(first.image, np.memmap)
    again = cached_canvas(s, cache, 2.0, 4096, 32)  # same slide, same settings: the cache itself
    assert again.path == first.path and _same(again, first)
    # --slide-mpp 0.25 (level-0 px half the size): origin and canvas in level-0 px change with it
    over = cached_canvas(s, cache, 2.0, 4096, 32, slide_mpp=0.25)
    want = read_canvas(s, 2.0, 4096, 32, slide_mpp=0.25)
    assert over.slide_mpp == 0.25 and _same(over, want) and not _same(over, first)
    back = cached_canvas(s, cache, 2.0, 4096, 32)  # the slide's own mpp again: read again, as the first time
    assert _same(back, first)
    # another scan under the same name (other dimensions, other tissue): its own canvas, not the cached one
    make_slide(s, (1024, 800), mpp=0.5, seed=5, blobs=2)
    new = cached_canvas(s, cache, 2.0, 4096, 32)
    assert _same(new, read_canvas(s, 2.0, 4096, 32)) and not _same(new, first)
    assert _same(cached_canvas(s, cache, 2.0, 4096, 32), new)


def _stripes(x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:  # noqa: ARG001
    """Dark tissue with 16 px wide glass stripes starting at level-0 x = 1000 and 7000."""
    xs = x0 + (np.arange(w) + 0.5) * ds
    out = np.full((h, w, 3), (120, 60, 150), np.uint8)
    for lx in (1000, 7000):
        out[:, (xs >= lx) & (xs < lx + 16)] = 250
    return out


def test_canvas_px_map_to_the_level0_px_they_were_read_from(tmp_path: Path) -> None:
    """A 0.504 µm/px scan asked for at 0.5 µm/px is read 1:1 (within the reader's 1 % tolerance): canvas px k lies at
    level-0 px origin + k, not origin + k * 0.5 / 0.504 (the heatmap's positions drifted 56 px by x = 7000)."""
    from gigaslide.slides.writer import write_pyramidal_tiff

    s = write_pyramidal_tiff(tmp_path / "s.tif", 8000, 1200, _stripes, mpp=0.504, tile=256, compression="none")
    for c in (read_canvas(s, 0.5, 65536, 32), cached_canvas(s, tmp_path / "cache", 0.5, 65536, 32),
              cached_canvas(s, tmp_path / "cache", 0.5, 65536, 32)):
        h, w = c.content_size
        row = np.asarray(c.image)[:, h // 2, :7500].astype(int).sum(0)  # (glass beyond the slide's edge: not a stripe)
        cols = np.flatnonzero(row > 700)
        starts = cols[np.r_[True, np.diff(cols) > 1]]
        assert len(starts) == 2
        level0 = c.origin[0] + starts * c.level0_per_px
        assert np.abs(level0 - [1000, 7000]).max() <= 1, level0
        xy = c.position_coords((1, w // 8), 8)  # positions of 8 canvas px: each lands on its own level-0 px
        assert np.abs(xy[:, 0] - (c.origin[0] + np.arange(w // 8) * 8)).max() <= 1
