"""An encoder that outputs NaN / Inf never has its features written (review round 6, lens H)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gigaslide.encoders import build_encoder
from gigaslide.encoders.inference import nonfinite_error
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.extract import encode_slides
from gigaslide.features.tiles import embed_tile_folder
from gigaslide.testing import make_slide, make_tile_folder
from gigaslide.tiling import TilingParams

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)


def _poisoned():
    enc = build_encoder("test_resnet", "random", seed=0)
    with torch.no_grad():
        next(iter(enc.trunk.parameters())).fill_(float("nan"))  # a damaged checkpoint: same weights id as seed 0
    return enc


def test_nan_encoder_fails_each_slide_writes_nothing_and_a_rerun_finishes(tmp_path):
    slides = [make_slide(tmp_path / "a.tiff", (768, 512), seed=1), make_slide(tmp_path / "b.tiff", (512, 512), seed=2)]
    res = encode_slides(slides, tmp_path / "out", _poisoned(), PARAMS, batch_size=8, workers=0, precision="fp32")
    assert res.done == [] and sorted(res.failed) == ["a", "b"]  # wrote NaN features for both and called them done
    assert "the encoder gave NaN features for" in res.failed["a"] and "precision fp32" in res.failed["a"]
    assert "--weights" in res.failed["a"]
    assert not (tmp_path / "out" / "features" / "a.h5").exists()
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["slides"]["a"]["status"] == "failed"
    good = build_encoder("test_resnet", "random", seed=0)  # the same weights id: only the files decide
    res = encode_slides(slides, tmp_path / "out", good, PARAMS, batch_size=8, workers=0, precision="fp32")
    assert sorted(res.done) == ["a", "b"] and not res.failed
    assert np.isfinite(store.load(tmp_path / "out" / "features" / "a.h5").features).all()


def test_nonfinite_error_names_the_first_tile_and_the_precision_fix():
    feats = np.ones((4, 3), np.float32)
    assert nonfinite_error(feats, "fp16", what="slide x") is None
    feats[2, 1] = np.inf
    feats[3, 0] = np.nan
    coords = np.array([[0, 0], [1, 1], [5, 7], [9, 9]])
    err = nonfinite_error(feats, "fp16", what="slide x", path="x.svs", coords=coords)
    line = err.one_line()
    assert line.startswith("x.svs: the encoder gave NaN/Inf features for 2 of 4 tiles of slide x")
    assert "level-0 (5, 7)" in line and "--precision fp32" in line and "\n" not in line


def test_tile_folder_with_nan_encoder_is_refused(tmp_path):
    folder = make_tile_folder(tmp_path / "tiles", 2, size=32)
    with pytest.raises(GigaslideError, match="the encoder gave NaN features for 4 of 4 tiles"):
        embed_tile_folder(_poisoned(), folder, tmp_path / "f.h5")
    assert not (tmp_path / "f.h5").exists()
