"""Another slide file put in place under the same name, with the same size and resolution (a colour-normalised or
re-exported copy), is tiled and encoded again; the same file copied or moved elsewhere is still reused; grids and
feature files written before the identity was recorded are judged by time; a re-run with another explicit
``--precision`` encodes again (review round 5)."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from gigaslide.encoders import build_encoder
from gigaslide.features import store
from gigaslide.features.extract import encode_slides
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams, tile_slide
from gigaslide.tiling.job import IDENTITY_KEY, slide_identity

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)
SIZE = (1024, 768)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("test_resnet", "random", seed=0)


def _drop_identity(path) -> None:  # noqa: ANN001 - a file as gigaslide wrote it before the identity was recorded
    with h5py.File(path, "a") as f:
        del f.attrs[IDENTITY_KEY]


def test_slide_identity_is_cheap_content_not_name(tmp_path):
    a = make_slide(tmp_path / "a.tiff", SIZE, seed=0)
    b = make_slide(tmp_path / "b.tiff", SIZE, seed=7)
    copy = tmp_path / "elsewhere" / "a.tiff"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert slide_identity(a) == slide_identity(copy) and slide_identity(a).startswith(f"v1:{a.stat().st_size}:")
    assert slide_identity(a) != slide_identity(b)
    data = bytearray(copy.read_bytes())  # the same size, one byte of the last block changed
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert slide_identity(copy) != slide_identity(a)
    assert slide_identity(tmp_path / "missing.tiff") is None


def test_tile_redoes_another_file_of_same_name_size_and_mpp(tmp_path):
    s = make_slide(tmp_path / "s" / "a.tiff", SIZE, seed=0)
    old = tile_slide(s, tmp_path / "out", PARAMS)
    with h5py.File(tmp_path / "out" / "patches" / "a.h5") as f:
        assert f.attrs[IDENTITY_KEY] == slide_identity(s)
    make_slide(s, SIZE, seed=7)  # put in place under the same name: same dimensions and mpp
    fresh = tile_slide(s, tmp_path / "fresh", PARAMS)
    assert not np.array_equal(old.coords, fresh.coords)  # the two slides' tissue differs
    again = tile_slide(s, tmp_path / "out", PARAMS)
    np.testing.assert_array_equal(again.coords, fresh.coords)


def test_encode_redoes_another_file_and_reuses_a_copy(tmp_path, encoder):
    s = make_slide(tmp_path / "s" / "a.tiff", SIZE, seed=0)
    out = tmp_path / "out"
    assert encode_slides([s], out, encoder, PARAMS, workers=0, precision="fp32").done == ["a"]
    assert store.load(out / "features" / "a.h5").attrs[IDENTITY_KEY] == slide_identity(s)
    moved = tmp_path / "moved" / "a.tiff"  # the same file copied elsewhere (new times): still finished
    moved.parent.mkdir()
    shutil.copy(s, moved)
    assert encode_slides([moved], out, encoder, PARAMS, workers=0, precision="fp32").skipped == ["a"]
    make_slide(s, SIZE, seed=7)
    res = encode_slides([s], out, encoder, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"] and not res.skipped
    encode_slides([s], tmp_path / "fresh", encoder, PARAMS, workers=0, precision="fp32")
    got, want = store.load(out / "features" / "a.h5"), store.load(tmp_path / "fresh" / "features" / "a.h5")
    np.testing.assert_array_equal(got.coords, want.coords)
    np.testing.assert_array_equal(got.features, want.features)


def test_records_without_identity_are_judged_by_time(tmp_path, encoder):
    """A grid / feature file written before identities were recorded is reused while the slide file has not changed
    since it was written, and made again (now with the identity) once another file was put in place."""
    s = make_slide(tmp_path / "s" / "a.tiff", SIZE, seed=0)
    out = tmp_path / "out"
    encode_slides([s], out, encoder, PARAMS, workers=0, precision="fp32")
    grid_file, feat_file = out / "patches" / "a.h5", out / "features" / "a.h5"
    for f in (grid_file, feat_file):
        _drop_identity(f)  # written (now) after the slide
    assert encode_slides([s], out, encoder, PARAMS, workers=0, precision="fp32").skipped == ["a"]
    g = tile_slide(s, out, PARAMS)
    assert IDENTITY_KEY not in g.extra  # reused as it was
    new = make_slide(tmp_path / "new.tiff", SIZE, seed=7)
    old = grid_file.stat().st_mtime - 3600
    os.utime(new, (old, old))  # made before the records ...
    os.replace(new, s)  # ... and moved in place since: its mtime is older than the records, its ctime newer
    res = encode_slides([s], out, encoder, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"]
    with h5py.File(grid_file) as f:
        assert f.attrs[IDENTITY_KEY] == slide_identity(s)
    assert store.load(feat_file).attrs[IDENTITY_KEY] == slide_identity(s)
    np.testing.assert_array_equal(store.load(feat_file).coords, tile_slide(s, tmp_path / "fresh", PARAMS).coords)


def test_rerun_with_another_explicit_precision_encodes_again(tmp_path, encoder):
    """``--precision fp32`` after a bf16 run kept the bf16 features ("already encoded"); ``auto`` keeps either."""
    s = make_slide(tmp_path / "a.tiff", (768, 768), seed=2)
    out = tmp_path / "out"
    encode_slides([s], out, encoder, PARAMS, workers=0, precision="bf16")
    assert encode_slides([s], out, encoder, PARAMS, workers=0, precision="auto").skipped == ["a"]
    assert encode_slides([s], out, encoder, PARAMS, workers=0, precision="bf16").skipped == ["a"]
    assert encode_slides([s], out, encoder, PARAMS, workers=0, precision="fp32").done == ["a"]
    ff = store.load(out / "features" / "a.h5")
    assert ff.attrs["precision"] == "fp32"
    encode_slides([s], tmp_path / "fp32", encoder, PARAMS, workers=0, precision="fp32")
    np.testing.assert_array_equal(ff.features, store.load(tmp_path / "fp32" / "features" / "a.h5").features)


def test_killed_inner_grid_write_is_cleaned(tmp_path):
    """The grid is written by ``save_grid`` into the identity write's temporary file: a run killed inside leaves
    ``.tmp-.tmp-<slide>.h5.*``, which the next tiling of the slide removes."""
    s = make_slide(tmp_path / "a.tiff", (768, 768), seed=2)
    left = tmp_path / "out" / "patches" / ".tmp-.tmp-a.h5.x1y2z3.h5.a1b2c3.h5"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half")
    tile_slide(s, tmp_path / "out", PARAMS)
    assert sorted(p.name for p in left.parent.iterdir()) == ["a.h5"]
