from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gigaslide.encoders import build_encoder
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.extract import encode_slides
from gigaslide.slides import open_slide
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams, load_grid, tile_slide

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("test_resnet", "random", seed=0)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    return [make_slide(d / "a.tiff", (1024, 768), seed=1), make_slide(d / "b.tiff", (768, 768), seed=2)]


@pytest.mark.parametrize("workers", [0, 1])
def test_encode_matches_direct_forward(tmp_path, encoder, two_slides, workers):
    res = encode_slides(two_slides, tmp_path, encoder, PARAMS, batch_size=7, workers=workers, precision="fp32")
    assert sorted(res.done) == ["a", "b"] and not res.failed
    ff = store.load(tmp_path / "features" / "a.h5")
    assert ff.features.shape == (len(ff.coords), encoder.embed_dim)
    assert ff.attrs["encoder"] == "test_resnet" and ff.attrs["mpp"] == 1.0 and ff.attrs["tile_size"] == 64
    assert ff.attrs["encoder_weights_sha256"] == "random-seed0"
    assert ff.coords_attrs["patch_size_level0"] == pytest.approx(128)
    with open_slide(two_slides[0]) as s:  # tile 3 re-read by hand gives the stored feature
        tile = s.read_region(tuple(ff.coords[3]), (64, 64), 1.0)
    with torch.no_grad():
        direct = encoder(torch.from_numpy(tile[None].copy())).numpy()
    np.testing.assert_allclose(ff.features[3], direct[0], rtol=1e-4, atol=1e-5)


def test_resume_skips_finished_and_manifest(tmp_path, encoder, two_slides):
    encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    res = encode_slides(two_slides, tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    assert res.skipped == ["a"] and res.done == ["b"]
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["slides"]["a"]["status"] == "done" and man["slides"]["b"]["tiles"] > 0
    other = build_encoder("test_resnet", "random", seed=1)  # other weights: not "finished"
    res = encode_slides(two_slides[:1], tmp_path, other, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"]


@pytest.mark.realdata
def test_broken_slide_is_reported_and_batch_goes_on(tmp_path, encoder, two_slides, real_slides):
    bad = [real_slides / "corrupt" / "unreadable.svs", real_slides / "corrupt" / "unopenable.tiff"]
    trunc = tmp_path / "trunc.svs"
    data = (real_slides / "cmu-1-small-region.svs").read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    res = encode_slides([*bad, trunc, *two_slides], tmp_path / "out", encoder, PARAMS, workers=1, precision="fp32")
    assert sorted(res.done) == ["a", "b"]
    assert set(res.failed) == {"unreadable", "unopenable", "trunc"}
    for msg in res.failed.values():
        assert "fix:" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "features" / "trunc.h5").exists()
    assert not list((tmp_path / "out").rglob(".tmp-*"))


def test_auto_precision_follows_the_check_it_records(tmp_path, encoder, two_slides, monkeypatch):
    import gigaslide.devices as devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # the probe decides (see test_devices)
    fp32 = encode_slides(two_slides[:1], tmp_path / "fp32", encoder, PARAMS, workers=0, precision="fp32")
    bf16 = encode_slides(two_slides[:1], tmp_path / "bf16", encoder, PARAMS, workers=0, precision="bf16")
    a32 = store.load(tmp_path / "fp32" / "features" / "a.h5").features
    a16 = store.load(tmp_path / "bf16" / "features" / "a.h5").features
    assert not np.array_equal(a32, a16)  # bf16 autocast really ran
    monkeypatch.setattr(devices, "BF16_MIN_COSINE", 1.01)  # no bf16 output can pass: auto must give fp32 bits
    strict = encode_slides(two_slides[:1], tmp_path / "strict", encoder, PARAMS, workers=0, precision="auto")
    assert strict.precision == fp32.precision == "fp32" and strict.bf16_cosine < 1.01
    np.testing.assert_array_equal(store.load(tmp_path / "strict" / "features" / "a.h5").features, a32)
    monkeypatch.setattr(devices, "BF16_MIN_COSINE", -1.0)  # any bf16 output passes: auto must give bf16 bits
    lax = encode_slides(two_slides[:1], tmp_path / "lax", encoder, PARAMS, workers=0, precision="auto")
    assert lax.precision == bf16.precision == "bf16"
    ff = store.load(tmp_path / "lax" / "features" / "a.h5")
    np.testing.assert_array_equal(ff.features, a16)
    assert ff.attrs["precision_requested"] == "auto" and ff.attrs["bf16_cosine"] == pytest.approx(lax.bf16_cosine)


def test_features_from_an_older_grid_rule_or_other_background_are_redone(tmp_path, encoder, two_slides):
    import h5py

    encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    f = tmp_path / "features" / "a.h5"
    assert store.load(f).attrs["grid_rule"] == 2 and store.load(f).attrs["stain"]
    man = json.loads((tmp_path / "manifest.json").read_text())["slides"]["a"]
    assert man["stain"] == store.load(f).attrs["stain"] and man["background"] == store.load(f).attrs["background"]
    assert encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32").skipped == ["a"]
    with h5py.File(f, "r+") as h:  # as written by the old, centred grid
        h.attrs["grid_rule"] = 1
    assert encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32").done == ["a"]
    dark = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5, background="bright")
    assert encode_slides(two_slides[:1], tmp_path, encoder, dark, workers=0, precision="fp32").done == ["a"]


def test_features_from_annotated_tissue_record_it_and_are_redone_when_the_annotation_changes(tmp_path, encoder, two_slides):
    ann = tmp_path / "ann"
    ann.mkdir()
    ring = [[0, 0], [192, 0], [192, 64], [0, 64], [0, 0]]  # three 64-px tiles at 1 um/px (slide at 0.5: 128 level-0 px)
    (ann / "a.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [[[2 * x, 2 * y] for x, y in ring]]}))
    params = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5, tissue_from=str(ann))
    assert encode_slides(two_slides[:1], tmp_path / "o", encoder, params, workers=0, precision="fp32").done == ["a"]
    ff = store.load(tmp_path / "o" / "features" / "a.h5")
    assert ff.coords.tolist() == [[0, 0], [128, 0], [256, 0]] and ff.attrs["tissue_source"] == "annotations"
    assert encode_slides(two_slides[:1], tmp_path / "o", encoder, params, workers=0, precision="fp32").skipped == ["a"]
    detected = encode_slides(two_slides[:1], tmp_path / "o", encoder, PARAMS, workers=0, precision="fp32")
    assert detected.done == ["a"]  # annotated features are not taken for detected ones
    assert "tissue_source" not in store.load(tmp_path / "o" / "features" / "a.h5").attrs
    encode_slides(two_slides[:1], tmp_path / "o", encoder, params, workers=0, precision="fp32")
    one = [[0, 0], [128, 0], [128, 128], [0, 128], [0, 0]]  # edited to the first tile only
    (ann / "a.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [one]}))
    again = encode_slides(two_slides[:1], tmp_path / "o", encoder, params, workers=0, precision="fp32")
    assert again.done == ["a"] and len(store.load(tmp_path / "o" / "features" / "a.h5")) == 1


def test_interrupted_write_leaves_nothing_half_written(tmp_path, encoder, two_slides, monkeypatch):
    import gigaslide.features.store as st

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise KeyboardInterrupt

    monkeypatch.setattr(st.h5py.File, "create_dataset", boom, raising=True)
    with pytest.raises(KeyboardInterrupt):
        encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    monkeypatch.undo()
    assert not (tmp_path / "features" / "a.h5").exists()
    assert not list(tmp_path.rglob(".tmp-*"))
    shutil.rmtree(tmp_path / "patches", ignore_errors=True)
    res = encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"]


def test_precision_choice_and_read_resolution_are_recorded(tmp_path, encoder, monkeypatch):
    import gigaslide.devices as devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # so that the probe runs and is recorded
    slide = make_slide(tmp_path / "a.tiff", (1024, 768), mpp=0.499, seed=1)
    res = encode_slides([slide], tmp_path, encoder, PARAMS, workers=0, precision="auto")
    ff = store.load(tmp_path / "features" / "a.h5")
    assert res.precision_choice["requested"] == "auto" and res.precision_choice["resolved"] == res.precision
    assert ff.attrs["precision"] == res.precision and ff.attrs["precision_requested"] == "auto"
    assert ff.attrs["bf16_cosine"] == pytest.approx(res.bf16_cosine)
    man = json.loads((tmp_path / "manifest.json").read_text())["slides"]["a"]
    assert man["precision"] == res.precision_choice
    # 1.0 µm/px is level 1 (2 x 0.499 = 0.998, within 1 %): read as it is, not resampled, and recorded
    assert ff.attrs["read_mpp"] == pytest.approx(0.998) and ff.attrs["mpp"] == 1.0
    assert ff.attrs["reader"] == "direct" and man["reader"] == "direct"


def test_direct_reader_and_openslide_give_the_same_features(tmp_path, encoder, two_slides):
    encode_slides(two_slides[:1], tmp_path / "d", encoder, PARAMS, workers=1, precision="fp32")
    encode_slides(two_slides[:1], tmp_path / "o", encoder, PARAMS, workers=0, precision="fp32", direct=False)
    a = store.load(tmp_path / "d" / "features" / "a.h5")
    b = store.load(tmp_path / "o" / "features" / "a.h5")
    assert a.attrs["reader"] == "direct" and b.attrs["reader"] == "openslide"
    np.testing.assert_array_equal(a.coords, b.coords)
    cos = (a.features * b.features).sum(1) / (np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1))
    assert cos.min() > 0.999  # pixels differ by at most 2 grey levels (sub-pixel painting)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_tiles_decoded_on_a_device_give_the_same_features_and_say_so(tmp_path, encoder, two_slides):
    encode_slides(two_slides, tmp_path / "c", encoder, PARAMS, batch_size=7, workers=1, precision="fp32")
    encode_slides(two_slides, tmp_path / "g", encoder, PARAMS, batch_size=7, precision="fp32", decode_device="cpu")
    for sid in ("a", "b"):
        a = store.load(tmp_path / "c" / "features" / f"{sid}.h5")
        b = store.load(tmp_path / "g" / "features" / f"{sid}.h5")
        assert a.attrs["reader"] == "direct" and b.attrs["reader"] == "direct, decoded on cpu"
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.features, b.features)  # the very same pixels
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert man["config"]["decode_device"] == "cpu" and man["config"]["workers"] == 0


def test_dct_downsampling_is_recorded_and_the_other_option_encodes_again(tmp_path, encoder):
    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.testing import tissue_fn

    one = write_pyramidal_tiff(tmp_path / "one.tiff", 1024, 768, tissue_fn(1024, 768, 3), mpp=0.5, min_level_size=10**6)
    out = tmp_path / "o"  # PARAMS' 1.0 µm/px is a /2 read of the only level
    box = encode_slides([one], out, encoder, PARAMS, precision="fp32", workers=0)
    a = store.load(out / "features" / "one.h5")
    assert box.done == ["one"] and a.attrs["downsample"] == "box" and a.attrs["downsample_option"] == "box"
    dct = encode_slides([one], out, encoder, PARAMS, precision="fp32", workers=0, downsample="dct")
    assert dct.done == ["one"] and not dct.skipped  # made with box: encoded again
    b = store.load(out / "features" / "one.h5")
    assert b.attrs["downsample"] == "dct" and b.attrs["downsample_option"] == "dct"
    cos = (a.features * b.features).sum(1) / (np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1))
    assert cos.min() > 0.99 and not np.array_equal(a.features, b.features)  # close, not the same pixels
    again = encode_slides([one], out, encoder, PARAMS, precision="fp32", workers=0, downsample="dct")
    assert again.skipped == ["one"]
    with pytest.raises(GigaslideError, match="--downsample dct decodes on the CPU"):
        encode_slides([one], out, encoder, PARAMS, downsample="dct", decode_device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device exists")
def test_decoding_on_cuda_without_cuda_is_a_one_line_error(tmp_path, encoder, two_slides):
    with pytest.raises(GigaslideError, match="--decode-device cuda: no CUDA device here"):
        encode_slides(two_slides, tmp_path, encoder, PARAMS, decode_device="cuda")
    with pytest.raises(GigaslideError, match="--decode-device gpu0: not a device"):
        encode_slides(two_slides, tmp_path, encoder, PARAMS, decode_device="gpu0")


def test_a_rerun_skips_untouched_finished_slides_without_reading_their_features(tmp_path, encoder, two_slides, monkeypatch):
    encode_slides(two_slides, tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    stamps = {k: v["file_stamp"] for k, v in json.loads((tmp_path / "manifest.json").read_text())["slides"].items()}
    assert stamps["a"][0] == (tmp_path / "features" / "a.h5").stat().st_size
    reads = []
    real = store.load
    monkeypatch.setattr(store, "load", lambda p: (reads.append(p), real(p))[1])
    again = encode_slides(two_slides, tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    assert sorted(again.skipped) == ["a", "b"] and reads == []  # attributes only: the data were whole when written
    f = tmp_path / "features" / "a.h5"
    f.write_bytes(f.read_bytes())  # touched since (same bytes, new mtime): read in full, checksums verified
    third = encode_slides(two_slides, tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    assert sorted(third.skipped) == ["a", "b"] and [p.name for p in reads] == ["a.h5"]


def test_batch_norms_are_folded_by_default_on_any_run_and_each_file_says_so(tmp_path, encoder, two_slides):
    default = encode_slides(two_slides[:1], tmp_path / "default", encoder, PARAMS, workers=0, precision="fp32")
    unfolded = encode_slides(two_slides[:1], tmp_path / "unfolded", encoder, PARAMS, workers=0, precision="fp32",
                             fold_bn=False)
    forced = encode_slides(two_slides[:1], tmp_path / "forced", encoder, PARAMS, workers=0, precision="fp32",
                           fold_bn=True)
    assert default.tiles == 10 and default.bn_folded and forced.bn_folded and not unfolded.bn_folded  # 10 tiles: folded
    for d, folded in (("default", True), ("unfolded", False), ("forced", True)):
        assert json.loads((tmp_path / d / "manifest.json").read_text())["config"]["bn_folded"] is folded
        ff = store.load(tmp_path / d / "features" / "a.h5")
        assert ff.attrs["bn_folded"] is folded
        # the features agree within float rounding either way
        np.testing.assert_allclose(ff.features, store.load(tmp_path / "unfolded" / "features" / "a.h5").features,
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(store.load(tmp_path / "default" / "features" / "a.h5").features,
                                  store.load(tmp_path / "forced" / "features" / "a.h5").features)


def test_a_slide_encoded_again_alone_gets_the_same_bytes_as_in_a_larger_run(tmp_path, encoder, two_slides):
    """A re-run re-encodes only the slide whose features went missing: its features must not depend on what else the
    run holds (the old default folded batch norms only in runs of >= 128 tiles: 272 here, then 93)."""
    params = TilingParams(mpp=1.0, tile_size=16, min_tissue=0.5)
    first = encode_slides(two_slides, tmp_path, encoder, params, workers=0, precision="fp32")
    b = tmp_path / "features" / "b.h5"
    before = store.load(b)
    assert sorted(first.done) == ["a", "b"] and first.tiles == 272 and len(before) == 93
    b.unlink()
    again = encode_slides(two_slides, tmp_path, encoder, params, workers=0, precision="fp32")
    assert again.done == ["b"] and again.skipped == ["a"] and again.tiles == 93
    after = store.load(b)
    assert after.features.tobytes() == before.features.tobytes()
    assert after.attrs["bn_folded"] is True and before.attrs["bn_folded"] is True


def test_a_corrected_slide_mpp_tiles_and_encodes_the_slide_again(tmp_path, encoder, synthetic_slide):
    def run(slide_mpp):  # noqa: ANN001, ANN202
        return encode_slides([synthetic_slide], tmp_path, encoder, PARAMS, workers=0, precision="fp32",
                             slide_mpp=slide_mpp)

    assert run(0.5).done == ["synth"]
    f = tmp_path / "features" / "synth.h5"
    assert store.load(f).attrs["slide_mpp"] == 0.5 and store.load(f).coords_attrs["patch_size_level0"] == 128
    res = run(0.25)  # the scan was at 0.25 µm/px after all: 1 µm/px tiles span twice the level-0 pixels
    assert res.done == ["synth"] and res.skipped == []
    ff = store.load(f)
    assert ff.attrs["slide_mpp"] == 0.25 and ff.coords_attrs["level0_mpp"] == 0.25
    assert ff.coords_attrs["patch_size_level0"] == 256
    grid = load_grid(tmp_path / "patches" / "synth.h5")
    assert grid.slide_mpp == 0.25 and grid.tile_size_level0 == 256 and len(grid) == len(ff)
    assert run(0.25).skipped == ["synth"]  # nothing changed: finished
    table = tmp_path / "mpp.csv"  # per slide, from a table: the slide's own row counts
    table.write_text("slide_id,mpp\nother,0.25\nsynth,0.5\n")
    assert run(str(table)).done == ["synth"] and store.load(f).attrs["slide_mpp"] == 0.5
    assert run(str(table)).skipped == ["synth"]
    assert run(None).skipped == ["synth"]  # the file's own 0.5 µm/px: the same scan


def test_a_slide_replaced_by_another_scan_under_its_name_is_tiled_and_encoded_again(tmp_path, encoder):
    src = make_slide(tmp_path / "s" / "a.tiff", (1024, 768), seed=1)
    assert encode_slides([src], tmp_path / "o", encoder, PARAMS, workers=0, precision="fp32").done == ["a"]
    make_slide(src, (768, 768), seed=2)  # another scan, same file name and resolution
    res = encode_slides([src], tmp_path / "o", encoder, PARAMS, workers=0, precision="fp32")
    assert res.done == ["a"] and res.skipped == []
    ff = store.load(tmp_path / "o" / "features" / "a.h5")
    assert ff.coords_attrs["level_dim"] == [768, 768]
    assert load_grid(tmp_path / "o" / "patches" / "a.h5").slide_dimensions == (768, 768)
    with open_slide(src) as s:  # the features are the new scan's
        tile = s.read_region(tuple(ff.coords[0]), (64, 64), 1.0)
    with torch.no_grad():
        np.testing.assert_allclose(ff.features[0], encoder(torch.from_numpy(tile[None].copy())).numpy()[0],
                                   rtol=1e-4, atol=1e-5)


def test_feature_files_without_the_newer_attributes_still_count_as_finished(tmp_path, encoder, two_slides):
    import h5py

    encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    f = tmp_path / "features" / "a.h5"
    with h5py.File(f, "r+") as h:  # as an older gigaslide wrote them
        del h.attrs["bn_folded"]
        del h["coords"].attrs["level_dim"]
        h.attrs["slide_path"] = "elsewhere/a.tiff"
    res = encode_slides(two_slides[:1], tmp_path, encoder, PARAMS, workers=0, precision="fp32")
    assert res.skipped == ["a"] and res.done == []


def test_features_record_the_absolute_path_of_the_slide_they_were_read_from(tmp_path, encoder, monkeypatch):
    import os
    import shutil

    monkeypatch.chdir(tmp_path)
    make_slide(tmp_path / "old" / "m.tiff", (1024, 768), seed=1)
    tile_slide("old/m.tiff", "out", PARAMS)  # tiled first; then the slides move
    shutil.move("old", "new")
    res = encode_slides(["new/m.tiff"], "out", encoder, PARAMS, workers=0, precision="fp32")
    assert res.done == ["m"]
    assert store.load("out/features/m.h5").attrs["slide_path"] == os.path.join(str(tmp_path), "new", "m.tiff")
    assert encode_slides(["new/m.tiff"], "out", encoder, PARAMS, workers=0, precision="fp32").skipped == ["m"]


def test_batches_that_cannot_fit_in_memory_are_refused_before_reading(tmp_path, monkeypatch):
    """`encode --tile-size 100000` used to end in a torch allocation traceback; now one line with a size that fits."""
    import gigaslide.features.extract as X

    room = 10**8
    monkeypatch.setattr(X, "available_memory", lambda: room)
    slide = make_slide(tmp_path / "s.tiff", (8192, 4096), blobs=8)  # 2048-px tiles at 1 µm/px: a few per slide
    enc = build_encoder("test_resnet", "random", seed=0)
    with pytest.raises(GigaslideError, match=r"batches of (\d+) tiles of 2048 px.*use --batch-size (\d+) or less") as e:
        encode_slides([slide], tmp_path / "o", enc, TilingParams(mpp=1.0, tile_size=2048, min_tissue=0.05),
                      batch_size=64, workers=0)
    n_slide = len(load_grid(tmp_path / "o" / "patches" / "s.h5").coords)
    assert f"batches of {n_slide} tiles" in str(e.value)  # a batch never spans slides: the slide's tiles, not 64
    fits = int(e.value.fix.split()[2])
    assert fits * 2048**2 * 3 * 7 <= room < (fits + 1) * 2048**2 * 3 * 7  # 7 batches: 2 slots + 1 + 4
    with pytest.raises(GigaslideError, match="use a --tile-size below"):
        X._check_batch_memory(1, 100_000, 0, room)
    X._check_batch_memory(fits, 2048, 0, room)  # the size it names passes
    assert not (tmp_path / "o" / "features").exists()


def _fluo(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
    """A fluorescence-like slide: green tissue over the lower two thirds, black elsewhere."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    g = np.where(Y > 260, 110 + ((X // 7 + Y // 5) % 9) * 15, 0)
    return np.stack([g // 4, g, g // 3], -1).astype(np.uint8)


def test_a_fluorescence_slides_edge_tiles_are_padded_black_and_recorded(tmp_path):
    """encode read every edge tile with white padding, also on dark-background slides; the reader pads with the
    grid's background now, the feature file says so, and features made before (no record) are encoded again."""
    import h5py

    from gigaslide.slides import iter_tiles
    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.tiling import load_grid

    slide = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128)
    enc = build_encoder("test_resnet", "random", seed=0)
    params = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.25)
    with pytest.warns(UserWarning, match="looks like a fluorescence image"):
        encode_slides([slide], tmp_path / "o", enc, params, workers=0, precision="fp32")
    grid = load_grid(tmp_path / "o" / "patches" / "fluo.h5")
    ff = store.load(tmp_path / "o" / "features" / "fluo.h5")
    assert grid.extra["background"] == "dark" and ff.attrs["edge_fill"] == "dark"
    ca = ff.coords_attrs
    assert ca["target_magnification"] == pytest.approx(10.0) and ca["level0_magnification"] == 20
    edge = int(np.argmax(ff.coords[:, 0]))  # a tile past the right edge (1100 is not a multiple of 128)
    assert ff.coords[edge, 0] + 128 > 1100
    with open_slide(slide) as s:
        black, white = (next(iter_tiles(s, ff.coords[edge:edge + 1], 64, 1.0, background=b))
                        for b in ("dark", "bright"))
    f_black, f_white = (enc.eval()(torch.from_numpy(t)[None]).detach().numpy()[0] for t in (black, white))
    assert np.abs(ff.features[edge] - f_black).max() < 1e-3 < np.abs(ff.features[edge] - f_white).max()
    with h5py.File(tmp_path / "o" / "features" / "fluo.h5", "a") as h:  # a file made before the fix
        del h.attrs["edge_fill"]
    again = encode_slides([slide], tmp_path / "o", enc, params, workers=0, precision="fp32")
    assert again.done == ["fluo"] and store.load(tmp_path / "o" / "features" / "fluo.h5").attrs["edge_fill"] == "dark"


def _features_listings(slides, out, encoder, monkeypatch):  # noqa: ANN001, ANN202
    """How often encoding ``slides`` into ``out`` lists ``out/features``."""
    import os

    listed: list[str] = []
    scandir = os.scandir

    def counted(path=".", *a):  # noqa: ANN001, ANN002, ANN202
        listed.append(str(path).rstrip("/"))
        return scandir(path, *a)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", counted)
        res = encode_slides(slides, out, encoder, PARAMS, workers=0, precision="fp32", tile_workers=0)
    assert sorted(res.done) == sorted(s.stem for s in slides), res.failed
    return listed.count(str(out / "features"))


def test_a_batch_lists_the_feature_folder_a_fixed_number_of_times_not_once_per_slide(tmp_path, encoder, monkeypatch):
    """Each slide's dead temporaries are removed before it is encoded, but features/ (n entries) is listed a fixed
    number of times per process, not once per slide: a batch of n slides was O(n^2)."""
    from gigaslide import atomic

    slides = [make_slide(tmp_path / "in" / f"s{i}.tiff", (512, 512), seed=i) for i in range(6)]
    counts = []
    for n in (2, 6):
        monkeypatch.setattr(atomic, "_tmp_listings", {})  # a fresh process
        counts.append(_features_listings(slides[:n], tmp_path / f"out{n}", encoder, monkeypatch))
    assert counts[0] == counts[1], counts  # old code: 2 + n


def test_a_slide_taken_over_from_a_dead_run_has_its_temporaries_cleared(tmp_path, encoder, monkeypatch):
    """Temporaries a killed run left are removed (this slide's only), also those of a slide whose run died after this
    process listed the folder: a slide taken over from a dead lock is looked up afresh."""
    import socket
    import subprocess
    import sys
    import time

    from gigaslide import locks

    slides = [make_slide(tmp_path / "in" / f"s{i}.tiff", (512, 512), seed=i) for i in range(3)]
    feats = tmp_path / "out" / "features"
    feats.mkdir(parents=True)
    stale = feats / ".tmp-s0.h5.abc123.h5"  # left by a run killed while writing s0
    stale.write_bytes(b"partial")
    other = feats / ".tmp-x9.h5.def456.h5"  # not this batch's slide
    other.write_bytes(b"partial")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    late = feats / ".tmp-s2.h5.ghi789.h5"
    acquire = locks.ItemLock.acquire

    def dying_holder(self):  # noqa: ANN001, ANN202
        if self.path.stem == "s2" and not late.exists():  # s2's run died after the listing: its lock and temporary stay
            rec = {"pid": dead.pid, "host": socket.gethostname(), "start": "1", "time": time.time()}
            self.path.write_text(json.dumps(rec))
            late.write_bytes(b"partial")
        return acquire(self)

    monkeypatch.setattr(locks.ItemLock, "acquire", dying_holder)
    res = encode_slides(slides, tmp_path / "out", encoder, PARAMS, workers=0, precision="fp32", tile_workers=0)
    assert sorted(res.done) == ["s0", "s1", "s2"], res.failed
    assert not stale.exists() and not late.exists() and other.exists()


def test_tiled_slides_waiting_to_be_encoded_keep_their_tile_count_not_their_grid(tmp_path, encoder, monkeypatch):
    """A job of thousands of slides held every slide's tile grid from tiling to the end (24 bytes a tile: gigabytes
    for a cohort). Waiting slides keep only their tile count; each grid is read back from patches/ when its slide
    is encoded, and dropped once its features are written. The features are those of a plain run."""
    from gigaslide.features import extract

    slides = [make_slide(tmp_path / "in" / f"s{i}.tiff", (512 + 128 * i, 512), seed=i) for i in range(3)]
    encode_slides(slides, tmp_path / "plain", encoder, PARAMS, workers=0, precision="fp32")
    seen: list = []
    collect = extract._Run.collect

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        jobs = collect(self, *a, **k)
        seen.extend(jobs)
        assert all(j.grid is None and j.n_tiles == len(load_grid(tmp_path / "out" / "patches" / f"{j.slide_id}.h5"))
                   for j in jobs), [(j.slide_id, j.grid, j.n_tiles) for j in jobs]
        return jobs

    monkeypatch.setattr(extract._Run, "collect", spy)
    res = encode_slides(slides, tmp_path / "out", encoder, PARAMS, workers=0, precision="fp32", tile_workers=0)
    assert sorted(res.done) == ["s0", "s1", "s2"] and len(seen) == 3
    assert all(j.grid is None for j in seen)  # dropped after encoding too
    for i in range(3):
        a = store.load(tmp_path / "plain" / "features" / f"s{i}.h5")
        b = store.load(tmp_path / "out" / "features" / f"s{i}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.features, b.features)
