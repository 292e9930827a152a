"""encode with tile_ahead: slides tiled in the background while earlier ones are encoded (the CUDA default, forced here)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gigaslide.encoders import build_encoder
from gigaslide.features import store
from gigaslide.features.extract import encode_slides
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("ahead")
    good = [make_slide(d / f"s{i}.tiff", (1536, 1024), seed=10 + i) for i in range(5)]
    broken = d / "broken.tiff"
    broken.write_bytes(b"not a slide")
    return good, broken


def _features(out):  # noqa: ANN001, ANN202
    return {p.stem: store.load(p) for p in (out / "features").glob("*.h5")}


@pytest.mark.parametrize("tile_workers", [1, 2])  # 1: the tiler thread tiles itself; 2: spawned processes
def test_tiling_ahead_gives_the_features_of_tiling_first_and_reports_a_broken_slide(slides, tmp_path, tile_workers):
    good, broken = slides
    enc = build_encoder("test_resnet", "random", seed=0)
    first = encode_slides(good, tmp_path / "first", enc, PARAMS, batch_size=16, workers=0, precision="fp32", tile_ahead=False)
    ahead = encode_slides([good[0], broken, *good[1:]], tmp_path / "ahead", enc, PARAMS, batch_size=16, workers=0,
                          precision="fp32", tile_ahead=True, tile_workers=tile_workers)
    assert sorted(ahead.done) == sorted(first.done) == [p.stem for p in good]
    assert list(ahead.failed) == ["broken"] and "broken.tiff" in ahead.failed["broken"]
    a, b = _features(tmp_path / "first"), _features(tmp_path / "ahead")
    for k in a:
        assert np.array_equal(a[k].coords, b[k].coords) and np.array_equal(a[k].features, b[k].features), k
    man = json.loads((tmp_path / "ahead" / "manifest.json").read_text())["slides"]
    assert man["broken"]["status"] == "failed" and all(man[p.stem]["status"] == "done" for p in good)
    assert not list((tmp_path / "ahead" / "locks").glob("*.lock")) and not list((tmp_path / "ahead").rglob(".tmp-*"))
    assert ahead.tiling_seconds < first.tiling_seconds  # nothing is tiled before the first forward pass


def test_the_first_slide_is_encoded_before_the_last_one_is_tiled(slides, tmp_path, monkeypatch):
    import gigaslide.features.extract as X

    good, _ = slides
    enc = build_encoder("test_resnet", "random", seed=0)
    first_forward: list[float] = []
    real = X.for_inference

    def timed(e, **kw):  # the model encode runs (batch norms folded): note when it first runs
        f = real(e, **kw)
        fwd = f.forward
        f.forward = lambda x: (first_forward.append(time.time()) if not first_forward else None, fwd(x))[1]
        return f

    monkeypatch.setattr(X, "for_inference", timed)
    res = encode_slides(good, tmp_path, enc, PARAMS, batch_size=16, workers=0, precision="fp32", tile_ahead=True,
                        tile_workers=1)
    assert sorted(res.done) == [p.stem for p in good]
    last_tiled = max((tmp_path / "patches" / f"{p.stem}.h5").stat().st_mtime for p in good)
    assert first_forward[0] < last_tiled
