"""Review round 7: feature-file attrs read fast and unchanged; a folder left holding two encoders' features is named."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from gigaslide.encoders import build_encoder
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.extract import encode_slides
from gigaslide.provenance import decode_attrs
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams
from gigaslide.tiling.store import h5_attrs

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)


def _odd_attrs(f: h5py.File) -> None:
    """Attrs of every kind other tools (CLAM, TRIDENT, h5py users) write."""
    a = f.attrs
    a["s"], a["u"], a["fixed"], a["i8"], a["u64"] = "abc", "µm ü", np.bytes_(b"hello"), np.int8(-3), np.uint64(2**63)
    a["f16"], a["f32"], a["nan"], a["b"], a["arr"] = np.float16(1.5), np.float32(0.1), np.nan, True, [1, 2]
    a["sarr"], a["empty"], a["cplx"], a["m2d"] = ["a", "b"], h5py.Empty("f"), np.complex64(1 + 2j), np.zeros((2, 2))
    a.create("ascii", data="xyz", dtype=h5py.string_dtype("ascii"))
    a.create("bad_ascii", data=b"\xff\xfe", dtype=h5py.string_dtype("ascii"))
    a.create("bad_utf8", data=b"\xff\xfe", dtype=h5py.string_dtype())
    a["comp"] = np.array((1, 2.0), dtype=[("x", "i4"), ("y", "f8")])
    a["enum"] = np.array(1, dtype=h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1"))
    a["bools"], a["one"], a["big_endian"] = np.array([True, False]), np.array([5]), np.array(2.5, ">f8")


def test_h5_attrs_reads_every_kind_of_attr_as_h5py_does(tmp_path):
    p = tmp_path / "odd.h5"
    with h5py.File(p, "w") as f:
        _odd_attrs(f)
    with h5py.File(p, "r") as f:
        want, got = decode_attrs(f.attrs), h5_attrs(f)
    assert list(got) == list(want)
    for k in want:  # NaN != NaN: compared by repr, and the Python types too
        assert (repr(got[k]), type(got[k])) == (repr(want[k]), type(want[k])), k


def test_loading_a_feature_file_reads_its_attrs_without_one_h5py_lookup_per_attr(tmp_path, monkeypatch):
    """``store.load`` read each attr through ``AttributeManager.__getitem__`` (two types and two space reads per
    attr: ~6 ms a file with encode's 44 attrs on a busy machine); gigaslide's own attrs now take the short path."""
    sid = "s1"
    p = store.save(tmp_path / f"{sid}.h5", np.ones((3, 4), np.float32), np.arange(6).reshape(3, 2),
                   attrs={"encoder": "resnet18", "encoder_weights_sha256": "ab" * 32, "mpp": 0.5, "tile_size": 224,
                          "slide_id": sid, "bn_folded": True, "slide_path": "/x/ü.svs"},
                   coords_attrs={"patch_size": 224, "patch_size_level0": 448.0, "level_dim": [100, 80],
                                 "downsample": [2.0, 2.0], "name": sid})
    with h5py.File(p, "r") as f:
        want = decode_attrs(f.attrs), decode_attrs(f["coords"].attrs)
    calls = []
    real = h5py.AttributeManager.__getitem__
    monkeypatch.setattr(h5py.AttributeManager, "__getitem__", lambda self, name: calls.append(name) or real(self, name))
    ff = store.load(p, arrays=False)
    assert (ff.attrs, ff.coords_attrs) == want
    assert store.read_all_attrs(p) == want
    assert calls == []


def test_encoding_another_encoder_into_a_folder_names_the_slides_left_from_the_first(tmp_path):
    """A second encoder into the same --out redid its own slides and kept the first encoder's others, with no word:
    the manifest's config then named the second encoder for every slide. Each entry now records what made it, and
    the job names the slides the folder holds from other settings (the CLI prints one warning line)."""
    a = make_slide(tmp_path / "a.tiff", (512, 512), seed=1)
    b = make_slide(tmp_path / "b.tiff", (512, 512), seed=2)
    out = tmp_path / "out"
    first = build_encoder("test_resnet", "random", seed=0)
    res = encode_slides([a, b], out, first, PARAMS, workers=0, precision="fp32")
    assert sorted(res.done) == ["a", "b"] and res.mixed == {}
    res = encode_slides([a, b], out, first, PARAMS, workers=0, precision="fp32")  # a re-run: nothing mixed
    assert res.mixed == {}
    other = build_encoder("test_resnet", "random", seed=1)
    res = encode_slides([a], out, other, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"]
    assert res.mixed == {"b": "weights random-seed0 (this job: random-seed1)"}
    slides = json.loads((out / "manifest.json").read_text())["slides"]
    assert slides["a"]["made_with"]["weights"] == "random-seed1"
    assert slides["b"]["made_with"]["weights"] == "random-seed0"
    assert store.read_attrs(out / "features" / "b.h5")["encoder_weights_sha256"] == "random-seed0"
    res = encode_slides([b], out, other, PARAMS, workers=0, precision="fp32")  # b redone: the folder agrees again
    assert res.done == ["b"] and res.mixed == {}


def test_encode_cli_warns_in_one_line_about_a_mixed_folder(tmp_path, capsys):
    from gigaslide.cli.main import main

    a = make_slide(tmp_path / "in" / "a.tiff", (512, 512), seed=1)
    make_slide(tmp_path / "in" / "b.tiff", (512, 512), seed=2)
    out = str(tmp_path / "out")
    opts = ["--weights", "random", "--mpp", "1.0", "--tile-size", "64", "--workers", "0", "--precision", "fp32"]
    assert main(["encode", str(tmp_path / "in"), "--out", out, "--encoder", "test_resnet", *opts]) == 0
    capsys.readouterr()
    assert main(["encode", str(a), "--out", out, "--encoder", "test_vit", *opts]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1 and "(b: encoder test_resnet (this job: test_vit))" in err[0] and "another --out" in err[0]


def test_a_provenance_attr_of_the_wrong_type_is_a_one_line_error_naming_the_file(tmp_path):
    """``load_dir`` (MIL, slide SSL) raised a bare ``ValueError: invalid literal for int()`` for a hand-edited or
    other tool's file whose ``tile_size`` is not a number."""
    d = tmp_path / "features"
    for sid, ts in (("a", 224), ("b", "abc")):
        store.save(d / f"{sid}.h5", np.ones((2, 3), np.float32),
                   attrs={"encoder": "x", "tile_size": ts, "slide_id": sid})
    with pytest.raises(GigaslideError, match="provenance field tile_size = 'abc' is not a whole number") as e:
        store.load_dir(tmp_path)
    assert "b.h5" in str(e.value)


@pytest.mark.parametrize("key, value", [("tile_size", "abc"), ("mpp", "x"), ("overlap", [1, 2])])
def test_a_feature_file_with_attrs_of_the_wrong_type_is_encoded_again_not_a_crash(tmp_path, key, value):
    """``is_finished`` compared ``int(attrs["tile_size"])`` outside its error handling: a re-run of encode over
    such a file stopped the whole job with a ``ValueError`` traceback."""
    a = make_slide(tmp_path / "a.tiff", (512, 512), seed=1)
    enc = build_encoder("test_resnet", "random", seed=0)
    encode_slides([a], tmp_path / "out", enc, PARAMS, workers=0, precision="fp32")
    f = tmp_path / "out" / "features" / "a.h5"
    with h5py.File(f, "r+") as h:
        h.attrs[key] = value
    res = encode_slides([a], tmp_path / "out", enc, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"] and not res.failed
    assert store.load(f).attrs[key] == {"tile_size": 64, "mpp": 1.0, "overlap": 0}[key]
