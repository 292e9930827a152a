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
