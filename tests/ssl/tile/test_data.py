"""Unlabelled tile sources: image folders, random tissue tiles from slides, deterministic batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.augment import MultiView, view_recipes
from gigaslide.ssl.tile.data import (ImageFolderSource, SlideSource, StepSampler, ViewDataset, build_source, collate_views,
                                     list_images)
from gigaslide.testing import make_tile_folder


def _folder(root: Path, n: int = 6, size: int = 40) -> Path:
    """``n`` tiles, half directly in ``root`` and half in ``root/sub`` (a recursive folder)."""
    return make_tile_folder(root, n // 2, size=size, classes=("", "sub"))


def test_empty_and_missing_folders_are_clear(tmp_path):
    with pytest.raises(GigaslideError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(GigaslideError, match="no images"):
        build_source(tmp_path / "empty", [0.5], 32)


def test_image_folder_recursive_and_skips_unreadable(tmp_path):
    d = _folder(tmp_path / "tiles")
    (d / "zz_broken.jpg").write_bytes(b"not a jpeg")
    src = ImageFolderSource(d)
    assert len(src) == 7
    g = torch.Generator().manual_seed(0)
    broken = [i for i, f in enumerate(src.files) if f.name == "zz_broken.jpg"][0]
    img = src.load(broken, g)  # falls through to the next readable file
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8


def test_all_unreadable_folder_fails_fast(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(GigaslideError, match="cannot read image"):
        ImageFolderSource(d)


def test_slide_source_multi_magnification(tmp_path, synthetic_slide):
    src = build_source(synthetic_slide, [0.5, 1.0], 64, min_tissue=0.5)
    assert isinstance(src, SlideSource)
    mpps = set(src.entries[:, 1].tolist())
    assert mpps == {0, 1}
    g = torch.Generator().manual_seed(0)
    tiles = [src.load(i, g) for i in range(0, len(src), max(1, len(src) // 8))]
    assert all(t.shape == (64, 64, 3) for t in tiles)
    # tissue, not glass (synthetic glass is 245 grey)
    assert np.mean([t.mean() < 235 for t in tiles]) > 0.7
    # a folder holding that slide is read as slides too
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / synthetic_slide.name).symlink_to(synthetic_slide)
    assert isinstance(build_source(folder, [1.0], 64), SlideSource)


def test_step_sampler_is_deterministic_and_covers_epoch():
    s = StepSampler(10, 4, seed=1)
    a = [s.batch(k) for k in range(5)]
    b = [StepSampler(10, 4, seed=1, start_step=k).batch(k) for k in range(5)]
    assert a == b
    first_epoch = [i for batch in a for i, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))
    ranks = [StepSampler(10, 2, seed=1, rank=r, world_size=2).batch(0) for r in range(2)]
    assert ranks[0] + ranks[1] == StepSampler(10, 4, seed=1).batch(0)


def test_view_dataset_same_key_same_views(tmp_path):
    src = ImageFolderSource(_folder(tmp_path / "tiles"))
    ds = ViewDataset(src, MultiView(view_recipes("two", "pathology", 32)), 32)
    v1, v2 = ds[(0, 123)], ds[(0, 123)]
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))
    assert not torch.equal(ds[(0, 124)][0], v1[0])
    batch = collate_views([ds[(i, i)] for i in range(3)])
    assert [tuple(b.shape) for b in batch] == [(3, 3, 32, 32)] * 2


def test_tiles_of_another_size_than_tile_size_are_named(tmp_path, caplog):
    """PCam's 96 px tiles under the default --tile-size 224 trained and exported a 224 px encoder without a word."""
    import logging

    d = _folder(tmp_path / "tiles", size=40)
    with caplog.at_level(logging.WARNING, logger="gigaslide.ssl.tile.data"):
        ImageFolderSource(d, tile_size=40)
        assert not caplog.records
        build_source(d, [0.5], 64)
    assert any("are 40x40 px" in r.getMessage() and "--tile-size is 64" in r.getMessage()
               and "give --tile-size 40" in r.getMessage() for r in caplog.records)


def _fluo(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
    """A fluorescence-like slide: green tissue over the lower two thirds, black elsewhere (red at most 230 // 4)."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    g = np.where(Y > 260, 110 + ((X // 7 + Y // 5) % 9) * 15, 0)
    return np.stack([g // 4, g, g // 3], -1).astype(np.uint8)


def test_slide_tiles_at_a_fluorescence_slides_edge_read_black_outside(tmp_path):
    """Tiles at the slide's bottom edge read a level's last, partly outside pixel row blended with white glass, also on
    dark-background slides (a 777 px high slide's level at /2 is 388 px: its last row lies half outside): pixels far
    brighter than any of the slide's (red 113 where the slide has at most 57). Outside the slide reads black there
    now, as encode reads it."""
    from gigaslide.slides.writer import write_pyramidal_tiff

    slide = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128, compression="zlib")
    src = SlideSource([slide], [1.0], 64, min_tissue=0.1)
    assert src.backgrounds == ["dark"]
    tiles = np.stack([src.load(i, torch.Generator().manual_seed(s)) for i in range(len(src)) for s in range(3)])
    bottom = tiles[:, -1].reshape(len(tiles), -1)
    assert (bottom.max(1) > 0).sum() >= 3  # tissue reaches the bottom edge in several tiles
    assert int(tiles[..., 0].max()) <= 230 // 4  # nothing brighter than the slide's own red


def test_a_forced_background_reaches_the_slide_reader(tmp_path):
    """pretrain had no ``--background`` for slides: a mis-detected slide could not be forced. Forced, it is what tissue
    detection uses and what a tile reads outside the slide: white glass on a dark slide forced ``bright`` (its edge
    tiles are brighter than any of its own pixels), black on a bright slide forced ``dark``."""
    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.testing import make_slide

    slide = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128, compression="zlib")
    src = build_source(slide, [1.0], 64, 0.1, "slides", None, "bright")
    assert src.backgrounds == ["bright"]
    tiles = np.stack([src.load(i, torch.Generator().manual_seed(s)) for i in range(len(src)) for s in range(3)])
    assert int(tiles[..., 0].max()) > 230 // 4  # white glass read outside the slide
    b = make_slide(tmp_path / "b.tiff", (300, 260), mpp=0.5, seed=0)
    src = build_source(b, [1.0], 64, 0.1, "auto", None, "dark")
    assert src.backgrounds == ["dark"]
    with pytest.raises(GigaslideError, match="unknown background 'grey'"):
        build_source(b, [1.0], 64, 0.1, "auto", None, "grey")


def test_a_forced_background_joins_the_run_identity_and_auto_resumes_older_runs():
    from gigaslide.ssl.tile.config import PretrainConfig, check_config, identity

    base = PretrainConfig(data="d", out="o", steps=1)
    assert "background" not in identity(base)  # runs made before --background (auto) resume unchanged
    assert identity(PretrainConfig(data="d", out="o", steps=1, background="dark"))["background"] == "dark"
    with pytest.raises(GigaslideError, match="unknown background 'grey'"):
        check_config(PretrainConfig(data="d", out="o", steps=1, background="grey"))


def test_pretrain_passes_a_forced_background_to_its_slides(tmp_path, monkeypatch):
    """``pretrain --background bright`` was recorded in the run but the slides were still read on the detected
    background: the session built its source without it."""
    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.ssl.tile import session
    from gigaslide.ssl.tile.engine import PretrainConfig, pretrain

    slide = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128, compression="zlib")
    built = []
    real = session.build_source

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        built.append(real(*a, **k))
        return built[-1]

    monkeypatch.setattr(session, "build_source", spy)
    cfg = PretrainConfig(data=str(slide), out=str(tmp_path / "run"), method="simclr", backbone="test_resnet",
                         tile_size=32, batch_size=4, steps=1, mpp=[1.0], min_tissue=0.1, background="bright",
                         method_args={"hidden_dim": 32, "out_dim": 16}, monitor_every=0, precision="fp32")
    pretrain(cfg)
    assert built and built[0].backgrounds == ["bright"]
