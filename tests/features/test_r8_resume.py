"""Round 8: the resume rule of encode for --precision, on a real feature file."""

from __future__ import annotations

from gigaslide.encoders import build_encoder
from gigaslide.features import store
from gigaslide.features.extract import encode_slides, is_finished
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams


def test_a_rerun_asking_another_precision_encodes_again_and_auto_keeps_what_was_made(tmp_path):
    """Features computed in fp32 are finished for --precision fp32 and auto, not for bf16 (nor fp16): a re-run asking
    another precision than the one recorded must not keep them."""
    slide = make_slide(tmp_path / "a.tiff", (512, 384), mpp=0.5)
    enc = build_encoder("test_resnet", "random")
    params = TilingParams(mpp=2.0, tile_size=32, min_tissue=0.1)
    res = encode_slides([slide], tmp_path / "out", enc, params, batch_size=16, workers=0, precision="fp32",
                        device="cpu")
    assert res.done == ["a"]
    path = tmp_path / "out" / "features" / "a.h5"
    assert store.read_attrs(path)["precision"] == "fp32"  # the premise
    assert is_finished(path, enc, params, precision="fp32") and is_finished(path, enc, params, precision="auto")
    assert not is_finished(path, enc, params, precision="bf16")
    assert not is_finished(path, enc, params, precision="fp16")


def test_a_rerun_skips_a_finished_slide_before_tiling_it(tmp_path):
    """A slide whose features are finished is skipped up front: its tile grid, deleted since, is not made again."""
    slide = make_slide(tmp_path / "a.tiff", (512, 384), mpp=0.5)
    enc = build_encoder("test_resnet", "random")
    params = TilingParams(mpp=2.0, tile_size=32, min_tissue=0.1)
    out = tmp_path / "out"
    assert encode_slides([slide], out, enc, params, batch_size=16, workers=0, device="cpu").done == ["a"]
    (out / "patches" / "a.h5").unlink()
    res = encode_slides([slide], out, enc, params, batch_size=16, workers=0, device="cpu")
    assert res.skipped == ["a"] and res.done == [] and not (out / "patches" / "a.h5").exists()
