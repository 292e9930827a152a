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


def _fluo(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
    """A fluorescence-like slide: green tissue over the lower two thirds, black elsewhere."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    g = np.where(Y > 260, 110 + ((X // 7 + Y // 5) % 9) * 15, 0)
    return np.stack([g // 4, g, g // 3], -1).astype(np.uint8)


def test_a_fluorescence_canvas_is_padded_black_and_an_older_cache_is_read_again(tmp_path: Path) -> None:
    """Canvases were padded with white glass (245) on the right/bottom, also on dark-background slides, where encode
    pads black: a dark slide's canvas is padded black now, the cache records the fill, and a dark slide's canvas
    cached before (no record) is read again, while a bright slide's is kept."""
    import json

    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.streaming.data import GLASS

    fluo = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128)
    bright = make_slide(tmp_path / "b.tif", (1024, 768), mpp=0.5, seed=1, blobs=1)
    cache = tmp_path / "cache"
    c = read_canvas(fluo, 2.0, 4096, 32)
    h, w = c.content_size
    img = np.asarray(c.image)
    assert c.shape != (h, w) and img[:, :h, :w].max() > 100  # padded to a multiple of 32
    assert (img[:, h:] == 0).all() and (img[:, :, w:] == 0).all() and c.background == "dark"
    b = read_canvas(bright, 2.0, 4096, 32)
    bh, bw = b.content_size
    assert b.background == "bright" and b.shape != (bh, bw) and (np.asarray(b.image)[:, :, bw:] == GLASS).all()
    for s, want in ((fluo, c), (bright, b)):
        first = cached_canvas(s, cache, 2.0, 4096, 32)
        assert _same(first, want) and first.background == want.background
        meta = cache / f"{Path(s).stem}.json"
        m = json.loads(meta.read_text())
        assert m["edge_fill"] == want.background
        del m["edge_fill"], m["background"]  # a canvas cached before the fix: padded white glass
        meta.write_text(json.dumps(m))
        old = np.array(want.image)
        old[:, h if s == fluo else bh:] = GLASS
        np.save(cache / f"{Path(s).stem}.npy", old)
        again = cached_canvas(s, cache, 2.0, 4096, 32)
        if s == fluo:  # read again, black
            assert _same(again, want) and json.loads(meta.read_text())["edge_fill"] == "dark"
        else:  # the cached canvas itself: nothing changed for a bright slide
            assert np.array_equal(np.asarray(again.image), old) and again.background == "bright"


def test_a_forced_background_sets_the_fill_and_a_canvas_cached_with_another_is_read_again(tmp_path: Path) -> None:
    """The streaming canvases had no ``--background``: a mis-detected slide could not be forced. Forced, it sets
    tissue detection's background and the fill (a dark slide forced ``bright`` is padded white glass, a bright one
    forced ``dark`` black); the cache records the option, and a canvas cached with another one is read again."""
    import json

    import pytest

    from gigaslide.errors import GigaslideError
    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.streaming.data import GLASS

    fluo = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128)
    bright = make_slide(tmp_path / "b.tif", (1024, 768), mpp=0.5, seed=1, blobs=1)
    cache = tmp_path / "cache"
    for s, forced, fill, auto in ((fluo, "bright", GLASS, "dark"), (bright, "dark", 0, "bright")):
        c = read_canvas(s, 2.0, 4096, 100, background=forced)
        h, w = c.content_size
        img = np.asarray(c.image)
        assert c.background == forced and c.shape != (h, w)
        assert (img[:, h:] == fill).all() and (img[:, :, w:] == fill).all()
        first = cached_canvas(s, cache, 2.0, 4096, 100, background=forced)
        assert _same(first, c) and first.background == forced
        meta = cache / f"{Path(s).stem}.json"
        assert json.loads(meta.read_text())["background_option"] == forced
        again = cached_canvas(s, cache, 2.0, 4096, 100)  # auto now: read again, not the forced canvas reused
        assert again.background == auto and _same(again, read_canvas(s, 2.0, 4096, 100))
        m = json.loads(meta.read_text())
        assert m["background"] == m["edge_fill"] == auto and m["background_option"] == "auto"
        np.save(cache / f"{Path(s).stem}.npy", np.zeros_like(np.asarray(again.image)))  # marks the cached canvas
        assert not np.asarray(cached_canvas(s, cache, 2.0, 4096, 100).image).any()  # same option: reused
    with pytest.raises(GigaslideError, match="unknown background 'grey'"):
        read_canvas(bright, 2.0, 4096, 100, background="grey")
