"""Whole-slide nuclei: each nucleus exactly once across region borders, exports, feature-store join, resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.nuclei import slide as nslide
from gigaslide.slides.writer import write_pyramidal_tiff

from .conftest import disc_image


def _disc_slide(path: Path, size: int = 600, mpp: float = 0.25) -> np.ndarray:
    img, inst, _ = disc_image(size, 80, radius=(5, 8), seed=3)
    write_pyramidal_tiff(path, size, size, lambda x0, y0, w, h, ds: img[int(y0):int(y0) + h * int(ds):int(ds),
                                                                          int(x0):int(x0) + w * int(ds):int(ds)],
                         mpp=mpp, compression="zlib", tile=128)
    return inst


def _oracle(model, img, **kw):  # noqa: ANN001, ANN003, ANN202
    """Dark pixels, connected components: translation-consistent, so borders are the only thing under test."""
    from scipy import ndimage as ndi

    fg = img.mean(-1) < 150
    inst = ndi.label(fg)[0].astype(np.int32)
    return inst, {}, fg.astype(np.float32)


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nslide, "segment", _oracle)


def test_nuclei_across_region_borders_are_kept_exactly_once(tiny_run: Path, tmp_path: Path, oracle: None) -> None:
    truth = _disc_slide(tmp_path / "s.tiff")
    n_true = len(np.unique(truth)) - 1
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128))
    assert res.done == ["s"] and res.nuclei == n_true
    g = json.loads((tmp_path / "out" / "nuclei" / "s.geojson").read_text())
    assert g["type"] == "FeatureCollection" and len(g["features"]) == n_true
    f0 = g["features"][0]
    assert f0["geometry"]["type"] == "Polygon" and f0["properties"]["objectType"] == "detection"
    assert f0["geometry"]["coordinates"][0][0] == f0["geometry"]["coordinates"][0][-1]
    cents = np.array([[f["properties"]["measurements"][k] for k in ("centroid_x_px", "centroid_y_px")]
                      for f in g["features"]])
    from scipy import ndimage as ndi

    true_c = np.array(ndi.center_of_mass(truth > 0, truth, range(1, n_true + 1)))[:, ::-1] + 0.5
    d = np.linalg.norm(cents[:, None] - true_c[None], axis=2)
    assert (d.min(1) < 0.05).all() and len(set(d.argmin(1))) == n_true  # every disc once, at its centroid
    area = np.array([f["properties"]["measurements"]["area_um2"] for f in g["features"]])
    true_area = np.bincount(truth.ravel())[1:] * 0.25 ** 2
    assert np.allclose(np.sort(area), np.sort(true_area), atol=1e-3)
    table = (tmp_path / "out" / "nuclei" / "s.csv").read_text().splitlines()
    assert table[0].startswith("id,centroid_x,centroid_y,area_um2,bbox_x0") and len(table) == n_true + 1


def test_nuclei_on_borders_kept_once_when_the_slide_is_resampled(tiny_run: Path, tmp_path: Path, oracle: None) -> None:
    """A slide at 0.22 µm/px read at the model's 0.25: neighbouring regions resample a border nucleus with other
    pixel phases, so their centroids of it differ by a fraction of a pixel, across the border: it was kept twice."""
    truth = _disc_slide(tmp_path / "s.tiff", mpp=0.22)
    n_true = len(np.unique(truth)) - 1
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128))
    assert res.done == ["s"] and res.nuclei == n_true
    g = json.loads((tmp_path / "out" / "nuclei" / "s.geojson").read_text())
    cents = np.array([[f["properties"]["measurements"][k] for k in ("centroid_x_px", "centroid_y_px")]
                      for f in g["features"]])
    from scipy import ndimage as ndi

    true_c = np.array(ndi.center_of_mass(truth > 0, truth, range(1, n_true + 1)))[:, ::-1] + 0.5
    d = np.linalg.norm(cents[:, None] - true_c[None], axis=2)
    assert (d.min(1) < 1.0).all() and len(set(d.argmin(1))) == n_true  # every disc once, near its centroid


def test_owner_keeps_a_border_nucleus_once_from_either_side() -> None:
    owners = nslide._Owner(np.array([0, 100]), np.array([0]), tol=3.0)
    assert owners.keeps(np.array([50.0, 50.0]), 0, 0) and owners.keeps(np.array([50.0, 50.0]), 0, 0)  # deep inside
    assert not owners.keeps(np.array([104.0, 50.0]), 0, 0)  # outside by more than tol: the neighbour's
    assert owners.keeps(np.array([99.6, 20.0]), 0, 0) and not owners.keeps(np.array([100.2, 20.0]), 1, 0)
    assert owners.keeps(np.array([100.3, 30.0]), 0, 0) and not owners.keeps(np.array([99.9, 30.0]), 1, 0)
    assert owners.keeps(np.array([104.0, 40.0]), 0, 0) is False and owners.keeps(np.array([103.5, 40.0]), 1, 0)
    assert owners.keeps(np.array([-2.0, 60.0]), 0, 0)  # the slide's own edge is no border


def test_tile_counts_join_the_feature_store_and_resume_is_identical(tiny_run: Path, tmp_path: Path, oracle: None) -> None:
    truth = _disc_slide(tmp_path / "s.tiff")
    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    coords = np.array([[0, 0], [200, 0], [0, 200], [400, 400]], np.int64)
    with h5py.File(out / "features" / "s.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((4, 8), np.float32))
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 200.0
    p = nslide.SlideParams(region=160, margin=24, tissue_only=False, window=128)
    nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out, p)
    with h5py.File(out / "nuclei" / "s_tiles.h5") as f:
        assert np.array_equal(f["coords"][:], coords)
        counts = f["count"][:]
        dens = f["density_per_mm2"][:]
    from scipy import ndimage as ndi

    c = np.array(ndi.center_of_mass(truth > 0, truth, range(1, truth.max() + 1)))[:, ::-1] + 0.5
    want = [int(((c[:, 0] >= x) & (c[:, 0] < x + 200) & (c[:, 1] >= y) & (c[:, 1] < y + 200)).sum()) for x, y in coords]
    assert counts.tolist() == want and dens[0] == pytest.approx(want[0] / (200 * 0.25 / 1000) ** 2)
    before = {q.name: q.read_bytes() for q in (out / "nuclei").glob("s*")}
    # a killed run leaves temporary files and no record: the re-run redoes the slide, identically
    (out / "nuclei" / "s.json").unlink()
    (out / "nuclei" / ".tmp-s.geojson.x.geojson").write_text("partial")
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out, p)
    assert res.done == ["s"]
    after = {q.name: q.read_bytes() for q in (out / "nuclei").glob("s*")}
    assert before.keys() == after.keys()
    assert all(before[k] == after[k] for k in before if not k.endswith((".json", ".h5")))
    assert not list((out / "nuclei").glob(".tmp-*"))
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out, p).skipped == ["s"]


def test_slide_coarser_than_the_model_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    _disc_slide(tmp_path / "coarse.tiff", size=300, mpp=0.5)
    res = nslide.segment_slides([tmp_path / "coarse.tiff"], tiny_run / "run", tmp_path / "out")
    assert "0.25 µm/px is finer than the scan (0.5 µm/px" in res.failed["coarse"]
    # the fix is one a nuclei user can follow (the model's mpp is fixed: no 'use --mpp 0.5')
    assert "--mpp 0.5 or coarser" not in res.failed["coarse"]
    assert "train a nuclei model at the scan's resolution (gigaslide nuclei-train --mpp 0.5)" in res.failed["coarse"]


def test_real_model_runs_on_a_generated_slide(tiny_run: Path, tmp_path: Path) -> None:
    from gigaslide.testing import make_slide

    make_slide(tmp_path / "g.tiff", (700, 500), mpp=0.25)
    res = nslide.segment_slides([tmp_path / "g.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=256, margin=32, tissue_only=False, window=256))
    assert res.done == ["g"] and not res.failed
    rec = json.loads((tmp_path / "out" / "nuclei" / "g.json").read_text())
    assert rec["nuclei"] == res.nuclei and rec["regions"] == 6
    with pytest.raises(GigaslideError, match="not a nuclei model"):
        nslide.segment_slides([tmp_path / "g.tiff"], tmp_path, tmp_path / "out")


def test_auto_precision_is_chosen_on_the_first_region_and_recorded(tiny_run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` compares bf16 with fp32 on the slide's first region: where they agree it runs exactly what an explicit
    ``--precision bf16`` runs, where they do not (threshold above 1) exactly what ``fp32`` runs; the record says which."""
    from gigaslide import devices
    from gigaslide.testing import make_slide

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # the probe decides (see test_devices)
    make_slide(tmp_path / "g.tiff", (700, 500), mpp=0.25)
    kw = dict(region=256, margin=32, tissue_only=False, window=256)

    def run(name: str, precision: str) -> tuple[dict, str]:
        out = tmp_path / name
        res = nslide.segment_slides([tmp_path / "g.tiff"], tiny_run / "run", out, nslide.SlideParams(**kw, precision=precision))
        assert not res.failed, res.failed
        return json.loads((out / "nuclei" / "g.json").read_text()), (out / "nuclei" / "g.csv").read_text()

    rec_auto, table_auto = run("auto", "auto")
    assert rec_auto["precision"]["requested"] == "auto" and 0.9 < rec_auto["precision"]["bf16_cosine"] <= 1.0
    resolved = rec_auto["precision"]["resolved"]
    assert resolved == ("bf16" if rec_auto["precision"]["bf16_cosine"] >= devices.BF16_MIN_COSINE else "fp32")
    assert table_auto == run("explicit", resolved)[1]
    monkeypatch.setattr(devices, "BF16_MIN_COSINE", 1.01)  # no bf16 output can pass: auto must fall back to fp32
    rec_strict, table_strict = run("strict", "auto")
    assert rec_strict["precision"]["resolved"] == "fp32"
    assert table_strict == run("fp32", "fp32")[1]
    assert run("fp32", "fp32")[0]["precision"] == {"requested": "fp32", "resolved": "fp32"}


def test_slide_outputs_name_the_classes_the_model_was_trained_on(typed_run: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every nucleus typed 2 by the (oracle) network is 'Tumor' (the model's stored name) in GeoJSON and CSV; one
    typed 0 (background all over it) has no class."""
    def typed_oracle(model, img, **kw):  # noqa: ANN001, ANN003, ANN202
        inst, _, npp = _oracle(model, img)
        return inst, {k: (2 if k % 4 else 0, 0.9) for k in range(1, int(inst.max()) + 1)}, npp

    monkeypatch.setattr(nslide, "segment", typed_oracle)
    _disc_slide(tmp_path / "s.tiff")
    res = nslide.segment_slides([tmp_path / "s.tiff"], typed_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128))
    assert res.done == ["s"] and res.nuclei > 0, res.failed
    g = json.loads((tmp_path / "out" / "nuclei" / "s.geojson").read_text())
    names = [(f["properties"].get("classification") or {}).get("name") for f in g["features"]]
    assert set(names) == {"Tumor", None} and names.count("Tumor") > names.count(None) > 0
    rows = (tmp_path / "out" / "nuclei" / "s.csv").read_text().splitlines()[1:]
    assert len(rows) == res.nuclei and sorted(r.split(",")[8] for r in rows) == sorted(n or "" for n in names)
    with h5py.File(tmp_path / "out" / "nuclei" / "s_tiles.h5") as f:
        assert json.loads(f.attrs["type_names"]) == {"1": "Lymphocyte", "2": "Tumor"}


@pytest.mark.parametrize(("option", "value", "message"), [
    ("margin", -100, "--margin -100 is under 16 px"), ("margin", 15, "--margin 15 is under 16 px"),
    ("region", -5, "--region -5 must be at least 1 px"), ("region", 0, "--region 0 must be at least 1 px")])
def test_bad_margin_or_region_is_refused_naming_the_option(tiny_run: Path, tmp_path: Path, option: str, value: int,
                                                          message: str, capsys: pytest.CaptureFixture) -> None:
    from gigaslide.cli.main import main

    with pytest.raises(GigaslideError, match=message):
        nslide.segment_slides([tmp_path / "none.tiff"], tiny_run / "run", tmp_path / "out",
                              nslide.SlideParams(**{option: value}))
    assert not (tmp_path / "out").exists()  # refused before anything is written
    _disc_slide(tmp_path / "s.tiff", size=200)
    rc = main(["nuclei", str(tmp_path / "s.tiff"), "--model", str(tiny_run / "run"), "--out", str(tmp_path / "cli"),
               f"--{option}", str(value)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "--tile-size" not in err
    assert nslide.MIN_MARGIN == 16
    nslide.SlideParams().check()  # the defaults (region 1024, margin 64) and the least margin pass
    nslide.SlideParams(margin=16, region=1).check()


def test_a_new_slide_mpp_or_a_replaced_slide_is_segmented_again(tiny_run: Path, tmp_path: Path, oracle: None) -> None:
    """A finished slide is skipped only when it is the same scan (level-0 mpp and dimensions): a corrected
    ``--slide-mpp`` changes every level-0 coordinate and area, another scan under the same name changes everything."""
    _disc_slide(tmp_path / "s.tiff", mpp=None)  # no mpp in the metadata: --slide-mpp gives it
    p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=64)
    out = tmp_path / "out"

    def run(slide_mpp: float) -> nslide.NucleiResult:
        return nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out, p, slide_mpp=slide_mpp)

    assert run(0.25).done == ["s"]
    areas_25 = (out / "nuclei" / "s.csv").read_text()
    assert run(0.25).skipped == ["s"]
    res = run(0.125)  # a finer scan than first said: the model reads it at half the size, areas in µm² change
    assert res.done == ["s"] and not res.skipped
    rec = json.loads((out / "nuclei" / "s.json").read_text())
    assert rec["slide_mpp"] == 0.125 and (out / "nuclei" / "s.csv").read_text() != areas_25
    assert run(0.125).skipped == ["s"]
    _disc_slide(tmp_path / "s.tiff", size=400, mpp=None)  # another scan under the same name, the same mpp
    res = run(0.125)
    assert res.done == ["s"] and not res.skipped
    fresh = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "fresh", p, slide_mpp=0.125)
    assert fresh.nuclei == res.nuclei
    assert (out / "nuclei" / "s.csv").read_text() == (tmp_path / "fresh" / "nuclei" / "s.csv").read_text()


def test_a_count_grid_the_slide_cannot_hold_fails_before_any_region_is_segmented(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(nslide, "segment", lambda *a, **kw: (calls.append(1), _oracle(*a, **kw))[1])
    _disc_slide(tmp_path / "small.tiff", size=600, mpp=0.25)
    res = nslide.segment_slides([tmp_path / "small.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128,
                                                   tile_size=1024, tile_mpp=0.5))
    assert "more than the slide" in res.failed["small"] and calls == []  # it used to segment the whole slide first


def _record_regions(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Segment with :func:`_oracle`, keeping a copy of every region read (the list returned)."""
    seen: list[np.ndarray] = []

    def keeping(model, img, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(img.copy())
        return _oracle(model, img, **kw)

    monkeypatch.setattr(nslide, "segment", keeping)
    return seen


def _fluo_slide(path: Path, size: tuple[int, int] = (600, 500), mpp: float = 0.25) -> None:
    """A fluorescence-like slide: bright nuclei (blue, DAPI-like) on a black background, tissue reaching every edge."""
    img, _, _ = disc_image(max(size), 80, radius=(5, 8), seed=3)
    fluo = np.where(img.mean(-1, keepdims=True) < 150, np.array([30, 40, 200]), np.array([0, 0, 0])).astype(np.uint8)
    write_pyramidal_tiff(path, *size, lambda x0, y0, w, h, ds: fluo[int(y0):int(y0) + h * int(ds):int(ds),
                                                                     int(x0):int(x0) + w * int(ds):int(ds)],
                         mpp=mpp, compression="zlib", tile=128)


def test_a_fluorescence_slide_reads_black_outside_and_an_older_result_is_redone(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regions at the slide's edge were read with white glass outside the slide, also on dark-background slides (where
    encode reads black): the network saw a bright frame around the tissue. Outside is black there now, the record and
    the tile counts say so, and a dark slide's result made before (no record of it) is redone; a bright one's is kept.
    A slide that does not look like H&E is warned about, as tile and encode do."""
    seen = _record_regions(monkeypatch)
    _fluo_slide(tmp_path / "f.tiff")
    _disc_slide(tmp_path / "s.tiff")
    out = tmp_path / "out"
    p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128)
    from gigaslide.tiling import StainWarning

    with pytest.warns(StainWarning, match="f: looks like a fluorescence image"):  # an H&E model may not transfer
        assert nslide.segment_slides([tmp_path / "f.tiff"], tiny_run / "run", out, p).done == ["f"]
    n_fluo = len(seen)
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out, p).done == ["s"]
    first = seen[0]  # the region at (0, 0), read from 24 px above and left of the slide
    assert first.shape[:2] == (128 + 48, 128 + 48)
    assert (first[:24] == 0).all() and (first[:, :24] == 0).all() and first[24:, 24:].max() == 200
    bright = seen[n_fluo]  # the bright slide's first region: glass outside, as before
    assert (bright[:24] == 255).all() and (bright[:, :24] == 255).all() and bright[24:, 24:].min() < 150
    for sid, bg in (("f", "dark"), ("s", "bright")):
        rec = json.loads((out / "nuclei" / f"{sid}.json").read_text())
        assert rec["edge_fill"] == rec["background"] == bg and (rec["stain"] == "fluorescence") == (bg == "dark")
        with h5py.File(out / "nuclei" / f"{sid}_tiles.h5") as f:
            assert f.attrs["edge_fill"] == bg
        del rec["edge_fill"], rec["background"]  # a result made before the fix
        (out / "nuclei" / f"{sid}.json").write_text(json.dumps(rec))
    with pytest.warns(StainWarning):
        again = nslide.segment_slides([tmp_path / "f.tiff", tmp_path / "s.tiff"], tiny_run / "run", out, p)
    assert again.done == ["f"] and again.skipped == ["s"]
    assert json.loads((out / "nuclei" / "f.json").read_text())["edge_fill"] == "dark"


def test_the_precision_probe_window_is_the_most_stained_one_on_either_background() -> None:
    """``auto`` precision is judged on the region's most stained window; on a dark (fluorescence) background that is
    the brightest one, not the darkest (which is black background there and says nothing about precision)."""
    img = np.zeros((96, 96, 3), np.uint8)
    img[:32, :32] = 200  # bright nuclei in the top-left corner, black elsewhere
    assert (nslide.probe_window(img, 32, "dark") == 200).all()
    assert (nslide.probe_window(255 - img, 32, "bright") == 55).all()
    assert (nslide.probe_window(img, 32, "bright") == 0).all()


def test_the_network_window_past_a_fluorescence_regions_edge_is_black(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The region read black outside the slide, but the inference windows past the region's own edge were padded
    with 255: a white frame in the network's input on a dark slide. They take the slide's fill now."""
    from gigaslide.nuclei import infer

    inputs: list[np.ndarray] = []
    real = infer.predict_maps

    def spy(model, image, **kw):  # noqa: ANN001, ANN003, ANN202
        hook = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().cpu().numpy().copy()))
        try:
            return real(model, image, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(infer, "predict_maps", spy)
    _fluo_slide(tmp_path / "f.tiff")
    p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=256)
    with pytest.warns(Warning):
        r = nslide.segment_slides([tmp_path / "f.tiff"], tiny_run / "run", tmp_path / "out", p)
    assert r.done == ["f"], r
    x = np.concatenate(inputs)  # [n, 3, 256, 256] in [0, 1]; a 176 px region in a 256 px window: padded on two sides
    assert x.shape[-1] == 256 and x.max() > 0.5  # the nuclei are there
    assert (x[:, :, -40:, :] == 0).all() and (x[:, :, :, -40:] == 0).all()  # padding black, not white


def test_edge_tiles_density_counts_their_area_on_the_slide(tiny_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The count tiles of the grid's last row and column reach past the slide: their density divides by the part on
    the slide (a 600 px slide on 224 px count tiles: the last row and column hold 152 px of 224), not by the whole
    tile."""
    monkeypatch.setattr(nslide, "segment", _oracle)
    _disc_slide(tmp_path / "s.tiff")
    p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=112)
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p).done == ["s"]
    with h5py.File(tmp_path / "out" / "nuclei" / "s_tiles.h5") as f:
        coords, area, dens, n = f["coords"][:], f["area_mm2"][:], f["density_per_mm2"][:], f["count"][:]
        full, tile0 = float(f.attrs["tile_area_mm2"]), 224
        assert list(f.attrs["slide_dimensions"]) == [600, 600]
    side = np.minimum(coords + tile0, 600) - coords  # px of each tile on the slide, per axis
    np.testing.assert_allclose(area, full * side[:, 0] * side[:, 1] / tile0 ** 2, rtol=1e-5)
    assert (area < full).any()
    np.testing.assert_allclose(dens, n / area, rtol=1e-5)


def _colour_oracle(model, img, **kw):  # noqa: ANN001, ANN003, ANN202
    """Dark pixels, one nucleus per colour (however many pieces it is in): exact at the model's mpp, no resampling."""
    fg = img.mean(-1) < 150
    code = img[..., 0].astype(np.int32) * 256 + img[..., 1]
    inst = np.zeros(fg.shape, np.int32)
    inst[fg] = np.unique(code[fg], return_inverse=True)[1].ravel() + 1
    return inst, {}, fg.astype(np.float32)


def _painted_slide(path: Path, discs: list[tuple[float, float, float, tuple[int, int, int]]], size: int = 200,
                   mpp: float = 0.25) -> None:
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), np.uint8) + np.array([230, 170, 205], np.uint8)
    for cx, cy, r, col in discs:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = col
    write_pyramidal_tiff(path, size, size, lambda x0, y0, w, h, ds: img[int(y0):int(y0) + h * int(ds):int(ds),
                                                                        int(x0):int(x0) + w * int(ds):int(ds)],
                         mpp=mpp, compression="zlib", tile=128)


def _polygons(f: dict) -> list:
    g = f["geometry"]
    return [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]


def test_a_nucleus_in_pieces_is_exported_whole_with_its_hole(tiny_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A nucleus in two pieces is a MultiPolygon of both (was its larger piece only, while its area counted both);
    a ring-shaped one keeps its hole as an inner ring; every outline's area is its pixels' less the corners cut."""
    from gigaslide.tiling.polygon import ring_area

    monkeypatch.setattr(nslide, "segment", _colour_oracle)
    _painted_slide(tmp_path / "s.tiff", [(60, 60, 8, (60, 40, 120)), (85, 60, 5, (60, 40, 120)),
                                         (140, 140, 10, (61, 40, 120)), (140, 140, 3, (230, 170, 205))])
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=64))
    assert res.nuclei == 2
    g = json.loads((tmp_path / "out" / "nuclei" / "s.geojson").read_text())
    pieces, ring = sorted(g["features"], key=lambda f: f["properties"]["measurements"]["centroid_x_px"])
    assert pieces["geometry"]["type"] == "MultiPolygon" and len(_polygons(pieces)) == 2
    mids = [(np.array(p[0]).min(0) + np.array(p[0]).max(0)) / 2 for p in _polygons(pieces)]  # larger first
    assert np.allclose(mids, [[60.5, 60.5], [85.5, 60.5]], atol=0.5)  # pixel centres at i + 0.5
    assert ring["geometry"]["type"] == "Polygon" and len(ring["geometry"]["coordinates"]) == 2
    for f in (pieces, ring):
        area = sum(abs(ring_area(np.array(p[0]))) - sum(abs(ring_area(np.array(h))) for h in p[1:])
                   for p in _polygons(f)) * 0.25 ** 2
        assert 0.9 < area / f["properties"]["measurements"]["area_um2"] < 1.02  # the larger piece alone: 0.71


def test_outlines_are_cut_to_the_slide_edge_on_a_resampled_slide(tiny_run: Path, tmp_path: Path,
                                                                  oracle: None) -> None:
    """A slide at 0.2527 µm/px read at the model's 0.25: nuclei on its edges were traced up to 0.26 px past them."""
    S = 201
    discs = [(cx, cy, 6, (60, 40, 120)) for i, t in enumerate(np.linspace(20, S - 20, 6))
             for cx, cy in ((t, 2 + i % 3), (t, S - 3 + i % 3), (2 + i % 3, t), (S - 3 + i % 3, t))]
    _painted_slide(tmp_path / "s.tiff", discs, size=S, mpp=0.2527)
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=64))
    assert res.nuclei == len(discs)
    g = json.loads((tmp_path / "out" / "nuclei" / "s.geojson").read_text())
    pts = np.array([v for f in g["features"] for p in _polygons(f) for r in p for v in r])
    assert pts.min() >= 0 and pts.max() <= S  # on the slide (were up to 0.26 px past its edges)
    rows = np.loadtxt(tmp_path / "out" / "nuclei" / "s.csv", delimiter=",", skiprows=1, usecols=(4, 5, 6, 7))
    assert rows.min() >= 0 and rows.max() <= S  # bboxes too


def test_results_of_an_older_format_are_segmented_again(tiny_run: Path, tmp_path: Path, oracle: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Results written before the outlines changed (every piece, cut to the slide: format 2) are redone on a re-run,
    without a traceback, like a fresh run; then skipped."""
    _disc_slide(tmp_path / "s.tiff", size=300)
    p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=64)
    with monkeypatch.context() as m:
        m.setattr(nslide, "SLIDE_FORMAT", "gigaslide.nuclei-slide/1")
        assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p).done == ["s"]
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p)
    assert res.done == ["s"] and not res.skipped and not res.failed
    assert json.loads((tmp_path / "out" / "nuclei" / "s.json").read_text())["format"] == "gigaslide.nuclei-slide/2"
    fresh = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "fresh", p)
    assert (tmp_path / "out" / "nuclei" / "s.geojson").read_text() == \
        (tmp_path / "fresh" / "nuclei" / "s.geojson").read_text()
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p).skipped == ["s"]


def test_a_forced_background_reaches_the_reader_and_a_result_of_another_is_redone(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--background`` was not an option of ``nuclei``: a mis-detected slide could not be forced. Forced, it sets the
    tissue detection's background and what the context outside the slide reads as (a dark slide forced ``bright``
    reads white glass, a bright one forced ``dark`` black); the record says so, and a result made at another
    ``--background`` is segmented again, not reused."""
    seen = _record_regions(monkeypatch)
    _fluo_slide(tmp_path / "f.tiff")
    _disc_slide(tmp_path / "s.tiff")
    slides, out = [tmp_path / "f.tiff", tmp_path / "s.tiff"], tmp_path / "out"
    for sid, forced, fill in (("f", "bright", 255), ("s", "dark", 0)):
        p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, background=forced)
        seen.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert nslide.segment_slides([tmp_path / f"{sid}.tiff"], tiny_run / "run", out, p).done == [sid]
        first = seen[0]  # the region at (0, 0), read from 24 px above and left of the slide
        assert (first[:24] == fill).all() and (first[:, :24] == fill).all(), sid
        rec = json.loads((out / "nuclei" / f"{sid}.json").read_text())
        assert rec["background"] == rec["edge_fill"] == forced and rec["background_option"] == forced
    auto = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = nslide.segment_slides(slides, tiny_run / "run", out, auto)
        assert again.done == ["f", "s"] and again.skipped == []  # made at another --background: redone
        for sid, bg in (("f", "dark"), ("s", "bright")):
            rec = json.loads((out / "nuclei" / f"{sid}.json").read_text())
            assert rec["background"] == rec["edge_fill"] == bg and rec["background_option"] == "auto"
        assert nslide.segment_slides(slides, tiny_run / "run", out, auto).skipped == ["f", "s"]


def test_an_unknown_background_is_refused_before_the_model_is_loaded(tmp_path: Path) -> None:
    with pytest.raises(GigaslideError, match="unknown background 'grey'") as e:
        nslide.segment_slides([tmp_path / "s.tiff"], tmp_path / "no_model", tmp_path / "out",
                              nslide.SlideParams(background="grey"))
    assert "--background auto, bright or dark" in e.value.one_line() and not (tmp_path / "out").exists()


def test_another_slide_of_the_same_size_and_mpp_under_the_name_is_segmented_again(tiny_run: Path, tmp_path: Path,
                                                                                   oracle: None) -> None:
    """Level-0 mpp and dimensions alike (a re-export, a colour-normalised copy): the file's identity tells them apart;
    the same file copied elsewhere is still done."""
    p = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=64)
    _disc_slide(tmp_path / "s.tiff", size=400)
    out = tmp_path / "out"
    first = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out, p)
    assert first.done == ["s"]
    table = (out / "nuclei" / "s.csv").read_text()
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "s.tiff").rename(moved / "s.tiff")
    assert nslide.segment_slides([moved / "s.tiff"], tiny_run / "run", out, p).skipped == ["s"]
    img, _, _ = disc_image(400, 80, radius=(5, 8), seed=11)  # other nuclei, same size and mpp
    write_pyramidal_tiff(moved / "s.tiff", 400, 400, lambda x0, y0, w, h, ds: img[int(y0):int(y0) + h * int(ds):int(ds),
                                                                               int(x0):int(x0) + w * int(ds):int(ds)],
                         mpp=0.25, compression="zlib", tile=128)
    again = nslide.segment_slides([moved / "s.tiff"], tiny_run / "run", out, p)
    assert again.done == ["s"] and (out / "nuclei" / "s.csv").read_text() != table  # other nuclei, other places


def test_a_slide_whose_path_is_not_utf8_fails_alone_before_any_work(tiny_run: Path, tmp_path: Path,
                                                                     oracle: None) -> None:
    """Its id and path cannot be written to the GeoJSON, table and record (a Latin-1 name from an old share)."""
    import os
    import shutil

    _disc_slide(tmp_path / "s.tiff")
    shutil.copy(tmp_path / "s.tiff", tmp_path / os.fsdecode(b"caf\xe9.tiff"))
    out = tmp_path / "out"
    res = nslide.segment_slides([tmp_path / os.fsdecode(b"caf\xe9.tiff"), tmp_path / "s.tiff"], tiny_run / "run", out,
                                nslide.SlideParams(region=256, margin=24, tissue_only=False, window=128))
    assert res.done == ["s"] and list(res.failed) == ["caf\\xe9"]
    assert "not valid UTF-8" in res.failed["caf\\xe9"] and "fix: rename" in res.failed["caf\\xe9"]
    raw = (out / "nuclei" / "manifest.json").read_bytes()
    assert b"\\udc" not in raw and json.loads(raw)["slides"]["caf\\xe9"]["status"] == "failed"
    assert sorted(p.name for p in (out / "nuclei").glob("caf*")) == []  # nothing written for it
