"""augment-cache: layout, shared augmentation per view, resume, disk budget, few tiles, mixed encoders, CLI."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.provenance import read_provenance
from gigaslide.ssl.slide.cache import SharedAugment, build_augment_cache, draw_views
from gigaslide.testing import make_slide

KW = dict(encoder="test_resnet", weights="random", views=3, tiles_per_view=6, mpp=2.0, tile_size=32, log=lambda *a: None)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return [str(make_slide(d / f"s{i}.tiff", (640, 448), mpp=2.0, seed=i)) for i in range(3)]


def test_cache_layout_and_provenance(slides, tmp_path):
    res = build_augment_cache(slides[:2], tmp_path / "c", **KW)
    assert res.done == ["s0", "s1"]
    with h5py.File(tmp_path / "c" / "features" / "s0.h5") as f:
        n, d = f["features"].shape
        assert f["views"].shape == (3, 6, d) and f["views"].dtype == np.float16
        assert f["view_coords"].shape == (3, 6, 2)
        idx = f["view_tiles"][:]
        np.testing.assert_array_equal(f["view_coords"][:], f["coords"][:][idx])
        for v in idx:
            assert len(set(v.tolist())) == 6  # a subset, without replacement
        a = dict(f.attrs)
        assert a["encoder"] == "test_resnet" and a["views"] == 3 and a["tiles_per_view"] == 6 and a["mpp"] == 2.0
        assert "gigaslide_version" in a and a["seed"] == 0
        # augmented view features differ from the plain ones of the same tiles
        assert not np.allclose(f["views"][0].astype(np.float32), f["features"][:][idx[0]], atol=1e-3)
    ff = store.load(tmp_path / "c" / "features" / "s0.h5")  # also a regular feature file
    assert ff.encoder == "test_resnet" and len(ff) == n
    assert ff.provenance.mpp == 2.0 and ff.provenance.tile_size == 32 and ff.provenance.encoder_weights_sha256
    rec = read_provenance(tmp_path / "c" / "cache.json")  # cache.json: the full provenance record
    assert rec.kind == "augment_cache" and rec.mpp == 2.0 and rec.tile_size == 32 and rec.seed == 0
    assert rec.encoder == "test_resnet" and rec.encoder_weights_sha256 == ff.provenance.encoder_weights_sha256


def test_shared_augmentation_is_one_per_view():
    aug = SharedAugment(16)
    t = torch.randint(0, 255, (1, 16, 16, 3), dtype=torch.uint8)
    tiles = t.repeat(3, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    v1 = aug(tiles, g)
    v2 = aug(tiles, g)
    torch.testing.assert_close(v1[0], v1[1])  # same augmentation for every tile of a view
    torch.testing.assert_close(v1[0], v1[2])
    assert not torch.allclose(v1[0], v2[0])  # the next view gets another one


def test_draw_views_with_replacement_only_when_needed():
    rng = np.random.default_rng(0)
    idx, repl = draw_views(10, 4, 5, rng)
    assert idx.shape == (4, 5) and not repl and all(len(set(r)) == 5 for r in idx.tolist())
    idx, repl = draw_views(3, 2, 5, rng)
    assert repl and idx.shape == (2, 5) and idx.max() < 3


def test_resume_budget_and_few_tiles(slides, tmp_path):
    out = tmp_path / "c"
    build_augment_cache(slides[:1], out, **KW)
    one = (out / "features" / "s0.h5").stat().st_size
    with pytest.raises(GigaslideError, match="disk budget"):
        build_augment_cache(slides, out, **{**KW, "max_gb": (one * 1.5) / 1e9})
    assert sorted(p.name for p in (out / "features").glob("*")) == ["s0.h5"]  # nothing half-written
    mtime = (out / "features" / "s0.h5").stat().st_mtime_ns
    res = build_augment_cache(slides, out, **KW)
    assert res.skipped == ["s0"] and res.done == ["s1", "s2"]
    assert (out / "features" / "s0.h5").stat().st_mtime_ns == mtime
    n = len(store.load(out / "features" / "s0.h5"))
    with pytest.warns(UserWarning, match="with replacement"):
        r2 = build_augment_cache(slides[:1], tmp_path / "few", **{**KW, "views": 2, "tiles_per_view": n + 1})
    assert r2.with_replacement == ["s0"]
    with h5py.File(tmp_path / "few" / "features" / "s0.h5") as f:
        assert f.attrs["with_replacement"] == 1 and f["views"].shape[:2] == (2, n + 1)


def test_mixed_encoders_refused(slides, tmp_path):
    build_augment_cache(slides[:1], tmp_path / "c", **KW)
    with pytest.raises(GigaslideError, match="other parameters"):
        build_augment_cache(slides[:1], tmp_path / "c", **{**KW, "encoder": "test_vit"})


def test_cli_end_to_end_and_errors(slides, tmp_path, capsys):
    c, r = str(tmp_path / "cache"), str(tmp_path / "run")
    assert main(["augment-cache", *slides, "--encoder", "test_resnet", "--weights", "random", "--views", "3",
                 "--tiles-per-view", "6", "--mpp", "2.0", "--tile-size", "32", "--out", c]) == 0
    assert main(["pretrain-slides", "--method", "gigassl", "--cache", c, "--out", r, "--epochs", "2",
                 "--out-dim", "16", "--width", "16", "--blocks", "1", "--norm", "layer", "--tiles-per-step", "4"]) == 0
    assert main(["embed-slides", "--model", r, "--features", c, "--ensemble", "4", "--fp16", "true",
                 "--out", str(tmp_path / "e.h5")]) == 0
    out = capsys.readouterr().out
    assert "3 slides x 16-d float16" in out and "32 bytes per slide" in out
    # bad input: clear one-line errors, exit code 2
    assert main(["pretrain-slides", "--method", "gigassl", "--cache", str(tmp_path / "none"), "--out", r + "2"]) == 2
    assert main(["pretrain-slides", "--method", "gigassl", "--out", r + "3"]) == 2
    assert main(["pretrain-slides", "--method", "byol", "--cache", c, "--out", r + "4"]) == 2
    assert main(["embed-slides", "--model", str(tmp_path), "--features", c]) == 2
    err = capsys.readouterr().err
    assert "cache folder not found" in err and "needs --cache" in err and "unknown --method" in err
    assert "not a slide-SSL run folder" in err and "Traceback" not in err


def test_interrupted_cache_resumes(slides, tmp_path):
    def boom(msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_augment_cache(slides[:2], tmp_path / "c", **{**KW, "log": boom})
    files = sorted(p.name for p in (tmp_path / "c" / "features").iterdir())
    assert files == ["s0.h5"]  # the finished slide, no temporary leftovers
    res = build_augment_cache(slides[:2], tmp_path / "c", **KW)
    assert res.skipped == ["s0"] and res.done == ["s1"]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # PIL, on the deliberately broken slide
def test_a_broken_slide_is_reported_and_the_batch_goes_on(slides, tmp_path, capsys):
    bad = tmp_path / "broken.tiff"
    bad.write_bytes(b"II*\x00not a tiff at all")
    res = build_augment_cache([slides[0], str(bad), slides[1]], tmp_path / "c", **KW)
    assert res.done == ["s0", "s1"] and list(res.failed) == ["broken"]
    assert "broken.tiff" in res.failed["broken"] and "\n" not in res.failed["broken"]
    rc = main(["augment-cache", slides[0], str(bad), "--encoder", "test_resnet", "--weights", "random", "--views", "3",
               "--tiles-per-view", "6", "--mpp", "2.0", "--tile-size", "32", "--out", str(tmp_path / "c")])
    cap = capsys.readouterr()
    assert rc == 2 and "1 already done" in cap.out and "1 of 2 slide(s) failed" in cap.err and "Traceback" not in cap.err


def test_auto_precision_follows_the_probe_it_records(slides, tmp_path, monkeypatch):
    import gigaslide.devices as devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # the probe decides (see test_devices)
    runs = {p: build_augment_cache(slides[:1], tmp_path / p, **{**KW, "precision": p}) for p in ("fp32", "bf16")}
    f32, f16 = (store.load(tmp_path / p / "features" / "s0.h5") for p in ("fp32", "bf16"))
    assert not np.array_equal(f32.features, f16.features)  # bf16 autocast really ran
    assert runs["fp32"].precision == {"requested": "fp32", "resolved": "fp32"}
    for threshold, want, ref in ((1.01, "fp32", tmp_path / "fp32"), (-1.0, "bf16", tmp_path / "bf16")):
        monkeypatch.setattr(devices, "BF16_MIN_COSINE", threshold)  # 1.01: no bf16 output passes; -1: any does
        out = tmp_path / f"auto{threshold}"
        res = build_augment_cache(slides[:1], out, **KW)  # precision defaults to auto
        assert res.precision["requested"] == "auto" and res.precision["resolved"] == want
        with h5py.File(out / "features" / "s0.h5") as a, h5py.File(ref / "features" / "s0.h5") as b:
            np.testing.assert_array_equal(a["features"][:], b["features"][:])  # the bits of the precision chosen
            np.testing.assert_array_equal(a["views"][:], b["views"][:])
            assert a.attrs["precision"] == want and a.attrs["precision_requested"] == "auto"
            assert a.attrs["bf16_cosine"] == pytest.approx(res.precision["bf16_cosine"])
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # emulated bf16: fp32 without a probe
    res = build_augment_cache(slides[:1], tmp_path / "emulated", **KW)
    assert res.precision == {"requested": "auto", "resolved": "fp32", "basis": devices.NO_NATIVE_BF16}
    with h5py.File(tmp_path / "emulated" / "features" / "s0.h5") as a:
        assert a.attrs["precision_basis"] == devices.NO_NATIVE_BF16 and "bf16_cosine" not in a.attrs


def test_a_resumed_build_leaves_the_cache_fingerprint_unchanged(slides, tmp_path, monkeypatch):
    import datetime as dt

    import gigaslide.provenance as provenance
    from gigaslide.runs import fingerprint

    out = tmp_path / "c"
    build_augment_cache(slides[:2], out, **KW)
    before = fingerprint(out)  # what a slide-SSL run trained on this cache records and checks when it resumes

    class Later(dt.datetime):  # the re-run happens a day later
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return dt.datetime.now(tz) + dt.timedelta(days=1)

    monkeypatch.setattr(provenance._dt, "datetime", Later)
    res = build_augment_cache(slides[:2], out, **KW)  # e.g. a pipeline re-run: every slide is done
    assert res.skipped == ["s0", "s1"] and not res.done
    assert fingerprint(out) == before


def test_slide_encoders_refuse_features_without_tile_positions(tmp_path):
    """Giga-SSL's sparse convolutions need each tile's cell: a tile folder's features (every coordinate 0) get a
    one-line error naming the file, not one cell shared by all tiles."""
    from gigaslide.ssl.slide.views import tile_cells

    store.save(tmp_path / "tiles.h5", np.zeros((4, 2), np.float32))
    with pytest.raises(GigaslideError, match="no tile positions") as e:
        tile_cells(store.load(tmp_path / "tiles.h5"))
    assert "tiles.h5" in str(e.value) and "gigaslide encode" in str(e.value)
    store.save(tmp_path / "slide.h5", np.zeros((3, 2), np.float32), np.array([[10, 10], [266, 10], [266, 266]]),
               coords_attrs={"patch_size_level0": 256.0})
    np.testing.assert_array_equal(tile_cells(store.load(tmp_path / "slide.h5")), [[0, 0], [1, 0], [1, 1]])


def test_tiles_from_tissue_annotations_are_recorded_and_an_edit_rebuilds_the_slide(slides, tmp_path, capsys):
    import json

    ann = tmp_path / "ann"
    ann.mkdir()

    def annotate(x1: int) -> None:  # 32-px tiles at 2 um/px = 32 level-0 px (slides at 2 um/px)
        ring = [[0, 0], [x1, 0], [x1, 64], [0, 64], [0, 0]]
        for s in ("s0", "s1"):
            (ann / f"{s}.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))

    annotate(128)
    kw = {**KW, "min_tissue": 0.5}
    res = build_augment_cache(slides[:2], tmp_path / "c", tissue_from=ann, **kw)
    assert res.done == ["s0", "s1"]
    ff = store.load(tmp_path / "c" / "features" / "s0.h5")
    assert sorted(map(tuple, ff.coords.tolist())) == [(x, y) for x in (0, 32, 64, 96) for y in (0, 32)]
    assert ff.attrs["tissue_source"] == "annotations" and read_provenance(tmp_path / "c" / "cache.json")
    assert build_augment_cache(slides[:2], tmp_path / "c", tissue_from=ann, **kw).skipped == ["s0", "s1"]
    annotate(64)  # edited: both slides are cached again from the new tissue (4 tiles: views drawn with replacement)
    with pytest.warns(UserWarning, match="with replacement"):
        again = build_augment_cache(slides[:2], tmp_path / "c", tissue_from=ann, **kw)
    assert again.done == ["s0", "s1"] and len(store.load(tmp_path / "c" / "features" / "s1.h5")) == 4
    with pytest.raises(GigaslideError, match="tissue_source"):  # one cache holds one tissue source
        build_augment_cache(slides[:2], tmp_path / "c", **kw)
    with pytest.raises(GigaslideError, match="tissue_source"):  # detected inside the annotations is another source
        build_augment_cache(slides[:2], tmp_path / "c", tissue_from=ann, tissue_detect=True, **kw)
    assert main(["augment-cache", *slides[:1], "--out", str(tmp_path / "x"), "--encoder", "test_resnet", "--weights",
                 "random", "--tissue-classes", "Tumor"]) == 2
    assert "needs --tissue-from" in capsys.readouterr().err


def test_cli_takes_a_folder_of_slides_and_names_a_missing_path_first(slides, tmp_path, capsys):
    """Like `encode`, `augment-cache` takes folders of slides; a path that does not exist is named before the
    encoder's weights are looked for (which would otherwise be the error a typo gets)."""
    from pathlib import Path

    c = tmp_path / "cache"
    assert main(["augment-cache", str(Path(slides[0]).parent), "--encoder", "test_resnet", "--weights", "random",
                 "--views", "2", "--tiles-per-view", "4", "--mpp", "2.0", "--tile-size", "32", "--out", str(c)]) == 0
    assert sorted(p.stem for p in (c / "features").glob("*.h5")) == sorted(Path(s).stem for s in slides)
    capsys.readouterr()
    assert main(["augment-cache", str(tmp_path / "typo"), "--out", str(tmp_path / "c2")]) == 2  # default weights
    err = capsys.readouterr().err
    assert "typo" in err and "not found" in err and "weights" not in err


def test_a_slide_is_read_a_batch_of_tiles_at_a_time(slides, tmp_path, monkeypatch):
    """The tiles of a slide are read (and held) a batch at a time, plus the views' own tiles once: a whole slide's
    tiles read into memory at once (~7 GB of 224 px tiles at 50,000 tiles) ended real-size slides out of memory. The
    features do not depend on the batch size."""
    import gigaslide.ssl.slide.cache as cache

    reads: list[int] = []
    real = cache._read

    def counting(slide, coords, *args):  # noqa: ANN001, ANN002, ANN202
        reads.append(len(coords))
        return real(slide, coords, *args)

    monkeypatch.setattr(cache, "_read", counting)
    build_augment_cache(slides[:1], tmp_path / "a", **{**KW, "batch_size": 8, "precision": "fp32"})
    n = len(store.load(tmp_path / "a" / "features" / "s0.h5"))
    assert n > 3 * 8 and sum(reads) <= n + 3 * 6 and max(reads) <= 3 * 6, (n, reads)
    build_augment_cache(slides[:1], tmp_path / "b", **{**KW, "batch_size": 1000, "precision": "fp32"})
    with h5py.File(tmp_path / "a" / "features" / "s0.h5") as a, h5py.File(tmp_path / "b" / "features" / "s0.h5") as b:
        np.testing.assert_allclose(a["features"][:], b["features"][:], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(a["view_tiles"][:], b["view_tiles"][:])


def test_a_second_slide_of_a_taken_id_fails_instead_of_counting_as_cached(slides, tmp_path):
    """Two slides named s0 (other folders): one cache file per id, so the second is failed and named, not reported as
    'already done' with the first slide's views standing for it."""
    import shutil

    other = tmp_path / "other" / "s0.tiff"
    other.parent.mkdir()
    shutil.copy(slides[1], other)
    res = build_augment_cache([slides[0], str(other)], tmp_path / "c", **KW)
    assert res.done == ["s0"] and res.skipped == [] and list(res.failed) == [str(other)]
    assert "slide id 's0' also used by" in res.failed[str(other)] and "\n" not in res.failed[str(other)]


def test_another_slide_file_under_a_cached_id_is_cached_again_and_a_moved_one_is_not(slides, tmp_path):
    """A later run given another file named s0 (another scan, a new cohort) caches it again -- with its own tile grid,
    as a fresh cache of it would be -- instead of counting the old slide's views as done; the same file moved to
    another folder is still done."""
    import shutil

    other = tmp_path / "other" / "s0.tiff"
    other.parent.mkdir()
    shutil.copy(slides[1], other)
    moved = tmp_path / "moved" / "s0.tiff"
    moved.parent.mkdir()
    shutil.copy(slides[0], moved)
    out = tmp_path / "c"
    build_augment_cache(slides[:1], out, **KW)
    assert build_augment_cache([str(moved)], out, **KW).skipped == ["s0"]
    res = build_augment_cache([str(other)], out, **KW)
    assert res.done == ["s0"] and res.skipped == []
    build_augment_cache([str(other)], tmp_path / "fresh", **KW)
    with h5py.File(out / "features" / "s0.h5") as f, h5py.File(tmp_path / "fresh" / "features" / "s0.h5") as g:
        for k in ("coords", "features", "views", "view_tiles"):
            np.testing.assert_array_equal(f[k][:], g[k][:])
    assert build_augment_cache([str(other)], out, **KW).skipped == ["s0"]  # and now it is done


def test_a_corrected_slide_mpp_caches_the_slide_again(slides, tmp_path):
    """The slide was cached at a wrong --slide-mpp; the re-run with the right one must not count the old views as
    done (they are tiles of another physical size)."""
    out = tmp_path / "c"
    build_augment_cache(slides[:1], out, **{**KW, "slide_mpp": 1.0})
    res = build_augment_cache(slides[:1], out, **KW)
    assert res.done == ["s0"] and res.skipped == []
    with h5py.File(out / "features" / "s0.h5") as f:
        assert f.attrs["slide_mpp"] == 2.0


def _fluo(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
    """A fluorescence-like slide: green tissue over the lower two thirds, black elsewhere."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    g = np.where(Y > 260, 110 + ((X // 7 + Y // 5) % 9) * 15, 0)
    return np.stack([g // 4, g, g // 3], -1).astype(np.uint8)


def test_a_fluorescence_slides_edge_tiles_are_padded_black_and_an_older_cache_is_rebuilt(tmp_path, monkeypatch):
    """The cache read edge tiles with white padding, also on dark-background slides (encode pads them black): the
    plain features and the views' tiles are read on the grid's background now, the file records ``edge_fill``, and
    a dark slide's file cached before (no record) is cached again, while a bright slide's is kept."""
    import gigaslide.ssl.slide.cache as cache
    from gigaslide.encoders import build_encoder
    from gigaslide.encoders.inference import for_inference
    from gigaslide.slides import open_slide
    from gigaslide.slides.writer import write_pyramidal_tiff

    fluo = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128)
    bright = str(make_slide(tmp_path / "s0.tiff", (640, 448), mpp=0.5, seed=0))
    reads: list[tuple[np.ndarray, np.ndarray]] = []
    real = cache._read

    def keeping(slide, coords, *args):  # noqa: ANN001, ANN002, ANN202
        px = real(slide, coords, *args)
        reads.append((np.asarray(coords).copy(), px.copy()))
        return px

    monkeypatch.setattr(cache, "_read", keeping)
    kw = {**KW, "encoder": build_encoder("test_resnet", "random", seed=0), "mpp": 1.0, "tile_size": 64,
          "tiles_per_view": 12, "batch_size": 1000, "precision": "fp32"}
    with pytest.warns(UserWarning, match="fluorescence"):
        res = build_augment_cache([str(fluo), bright], tmp_path / "c", **kw)
    assert res.done == ["fluo", "s0"]
    ff = store.load(tmp_path / "c" / "features" / "fluo.h5")
    assert ff.attrs["background"] == "dark" and ff.attrs["edge_fill"] == "dark"
    assert store.load(tmp_path / "c" / "features" / "s0.h5").attrs["edge_fill"] == "bright"
    edge = int(np.argmax(ff.coords[:, 0]))  # a tile past the right edge (1100 px wide, 128 px tiles)
    assert ff.coords[edge, 0] + 128 > 1100
    inside = (1100 - ff.coords[edge, 0]) // 2  # tile px inside the slide at 1 µm/px (level-0 0.5 µm/px)
    with open_slide(fluo) as s:
        def read(c, background):  # noqa: ANN001, ANN202 - the slide's pixels on that background
            return np.stack([s.read_region((int(x), int(y)), (64, 64), 1.0, background=background) for x, y in c])

        black, white = read(ff.coords[edge:edge + 1], "dark")[0], read(ff.coords[edge:edge + 1], "bright")[0]
        assert (black[:, inside + 1:] == 0).all() and (white[:, inside + 1:] == 255).all()
        (c_plain, plain), (c_views, views) = reads[:2]  # fluo's plain tiles (one batch), then its views' tiles
        np.testing.assert_array_equal(c_plain, ff.coords)
        past = (c_views[:, 0] + 128 > 1100) | (c_views[:, 1] + 128 > 777)
        assert past.sum() >= 2  # views hold edge tiles
        np.testing.assert_array_equal(plain, read(ff.coords, "dark"))
        np.testing.assert_array_equal(views[past], read(c_views[past], "dark"))
    with torch.inference_mode():
        f_black, f_white = (for_inference(kw["encoder"])(torch.from_numpy(t)[None]).numpy()[0] for t in (black, white))
    assert np.abs(ff.features[edge] - f_black).max() < 1e-3 < np.abs(ff.features[edge] - f_white).max()
    for sid in ("fluo", "s0"):  # files made before the fix
        with h5py.File(tmp_path / "c" / "features" / f"{sid}.h5", "a") as h:
            del h.attrs["edge_fill"], h.attrs["background"]
    again = build_augment_cache([str(fluo), bright], tmp_path / "c", **kw)
    assert again.done == ["fluo"] and again.skipped == ["s0"]
    assert store.load(tmp_path / "c" / "features" / "fluo.h5").attrs["edge_fill"] == "dark"
    with h5py.File(tmp_path / "c" / "features" / "fluo.h5", "a") as h:  # and without the cache's tile grid
        del h.attrs["edge_fill"]
    (tmp_path / "c" / "patches" / "fluo.h5").unlink()
    assert build_augment_cache([str(fluo)], tmp_path / "c", **kw).done == ["fluo"]


def test_a_forced_background_reaches_the_reader_and_a_cache_of_another_is_rebuilt(tmp_path, monkeypatch, capsys):
    """augment-cache had no ``--background`` (yet printed a StainWarning naming it): a mis-detected slide could not be
    forced. Forced, it sets tissue detection's background and the fill of edge tiles (a dark slide forced ``bright``
    reads white glass outside the slide, a bright one forced ``dark`` black); the files record it, and a slide cached
    at another ``--background`` is cached again, not reused."""
    import warnings

    import gigaslide.ssl.slide.cache as cache
    from gigaslide.slides.writer import write_pyramidal_tiff

    fluo = str(write_pyramidal_tiff(tmp_path / "fluo.tiff", 1100, 777, _fluo, mpp=0.5, tile=128))
    bright = str(make_slide(tmp_path / "s0.tiff", (640, 448), mpp=0.5, seed=0))
    fills: list[str | None] = []
    real = cache._read

    def keeping(slide, coords, tile_size, mpp, background="bright"):  # noqa: ANN001, ANN202
        fills.append(background)
        return real(slide, coords, tile_size, mpp, background)

    monkeypatch.setattr(cache, "_read", keeping)
    c = tmp_path / "c"
    args = ["--encoder", "test_resnet", "--weights", "random", "--views", "2", "--tiles-per-view", "4", "--mpp", "1.0",
            "--tile-size", "64", "--precision", "fp32", "--out", str(c)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for slide, forced in ((fluo, "bright"), (bright, "dark")):
            fills.clear()
            assert main(["augment-cache", slide, *args, "--background", forced]) == 0
            a = store.load(c / "features" / f"{Path(slide).stem}.h5").attrs
            assert a["background"] == a["edge_fill"] == a["background_option"] == forced
            assert fills and set(fills) == {forced}  # every tile read (plain and views) on the forced background
        fills.clear()
        assert main(["augment-cache", fluo, bright, *args]) == 0  # auto: both were cached at another --background
        assert "cached 2 slides" in capsys.readouterr().out
        assert set(fills) == {"dark", "bright"}
        for sid, bg in (("fluo", "dark"), ("s0", "bright")):
            a = store.load(c / "features" / f"{sid}.h5").attrs
            assert a["background"] == a["edge_fill"] == bg and a["background_option"] == "auto"
        assert main(["augment-cache", fluo, bright, *args]) == 0
        assert "cached 0 slides" in capsys.readouterr().out


def test_an_unknown_background_is_one_line_before_any_work(slides, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["augment-cache", slides[0], "--encoder", "test_resnet", "--weights", "random", "--out", str(out),
                 "--background", "grey"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--background 'grey' is not one of auto, bright, dark" in lines[0] and not out.exists()
    with pytest.raises(GigaslideError, match="unknown background 'grey'"):
        build_augment_cache(slides[:1], out, **{**KW, "background": "grey"})
    assert not out.exists()


def test_a_slide_given_by_a_relative_path_is_recorded_absolute(slides, tmp_path, monkeypatch):
    """The cache recorded the slide's path as typed (``mos/slides/...``): meaningless from another folder, unlike
    encode's feature files. It is absolute now."""
    from pathlib import Path

    monkeypatch.chdir(Path(slides[0]).parent)
    build_augment_cache([Path(slides[0]).name], tmp_path / "c", **KW)
    with h5py.File(tmp_path / "c" / "features" / "s0.h5") as f:
        assert f.attrs["slide_path"] == str(Path(slides[0]).resolve())


def test_another_slide_file_of_the_same_byte_size_under_a_cached_id_is_cached_again(tmp_path):
    """Same id, level-0 size, mpp and byte size (uncompressed: a re-export, a colour-normalised copy): the file's
    identity (sampled blocks' hash) tells the two apart."""
    a = make_slide(tmp_path / "a" / "s0.tiff", (640, 448), mpp=2.0, seed=0, compression="none")
    b = make_slide(tmp_path / "b" / "s0.tiff", (640, 448), mpp=2.0, seed=1, compression="none")
    assert a.stat().st_size == b.stat().st_size
    out = tmp_path / "c"
    build_augment_cache([str(a)], out, **KW)
    with h5py.File(out / "features" / "s0.h5") as f:
        before = f["features"][:]
    res = build_augment_cache([str(b)], out, **KW)
    assert res.done == ["s0"] and res.skipped == []
    with h5py.File(out / "features" / "s0.h5") as f:
        assert f["features"].shape != before.shape or not np.array_equal(f["features"][:], before)
    assert build_augment_cache([str(b)], out, **KW).skipped == ["s0"]
