"""AnnData and QuPath GeoJSON exports, read back the way scverse and QuPath read them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.mil.train import load_model, predict


def _held_out(run, sid):  # noqa: ANN001, ANN202
    import csv

    with open(run / "predictions.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["slide_id"] == sid)
    return int(row["fold"]), float(row["prob_1"]), int(row["label"])


def test_anndata_round_trip(tiny, tmp_path):
    import anndata as ad

    from gigaslide.cli.main import main

    out = tmp_path / "features.h5ad"
    assert main(["export", "anndata", str(tiny.out), "--out", str(out), "--runs", str(tiny.run)]) == 0
    a = ad.read_h5ad(out)
    files = {f"s{i}": store.load(tiny.out / "features" / f"s{i}.h5") for i in range(6)}
    assert a.n_obs == sum(len(f) for f in files.values()) and a.n_vars == files["s0"].dim
    s2 = (a.obs["slide_id"] == "s2").to_numpy()
    np.testing.assert_array_equal(a.X[s2], files["s2"].features)
    np.testing.assert_array_equal(a.obsm["spatial"][s2], files["s2"].coords)
    np.testing.assert_array_equal(a.obs.loc[s2, "tile"].to_numpy(), np.arange(len(files["s2"])))
    fold, p1, label = _held_out(tiny.run, "s2")
    assert (a.obs.loc[s2, "run fold"] == fold).all() and (a.obs.loc[s2, "run label"] == label).all()
    assert a.obs.loc[s2, "run P(class 1)"].to_numpy() == pytest.approx(p1, abs=1e-6)
    model, _ = load_model(tiny.run / f"fold{fold}")
    _, scores = predict(model, [torch.from_numpy(files["s2"].features)])
    assert a.obs.loc[s2, "run attention"].to_numpy() == pytest.approx(scores[0], rel=1e-5)
    assert (a.obs["tissue"] >= 0.25).all()  # tiling kept tiles with at least 25 % tissue
    u = a.uns["gigaslide"]
    assert u["encoder"] == "test_resnet" and u["mpp"] == 1.0 and u["kind"] == "anndata_export"
    assert u["runs"]["run"]["model"] == "abmil" and u["slides"]["s2"]["n_tiles"] == len(files["s2"])
    assert str(a.obs["slide_id"].dtype) == "category"


def test_qupath_geojson_round_trip(tiny, tmp_path):
    from gigaslide.cli.main import main

    out = tmp_path / "geojson"
    assert main(["export", "qupath", str(tiny.out), "--runs", str(tiny.run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", *[f"s{i}.geojson" for i in range(6)]]
    rec = json.loads((out / "provenance.json").read_text())  # GeoJSON has no place for it that QuPath keeps
    assert rec["kind"] == "qupath_export" and rec["encoder"] == "test_resnet" and rec["mpp"] == 1.0
    assert rec["runs"]["run"]["model"] == "abmil" and rec["slides"]["s3"]["n_tiles"] == len(store.load(
        tiny.out / "features" / "s3.h5"))
    gj = json.loads((out / "s3.geojson").read_text())
    ff = store.load(tiny.out / "features" / "s3.h5")
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(ff)
    fold, p1, _ = _held_out(tiny.run, "s3")
    model, _ = load_model(tiny.run / f"fold{fold}")
    _, scores = predict(model, [torch.from_numpy(ff.features)])
    alone, _ = predict(model, [torch.from_numpy(ff.features[i:i + 1]) for i in range(len(ff))])
    for i, f in enumerate(gj["features"]):
        assert f["properties"]["objectType"] == "tile"
        ring = np.asarray(f["geometry"]["coordinates"][0])
        x, y = ff.coords[i]
        assert f["geometry"]["type"] == "Polygon"
        np.testing.assert_allclose(ring, [[x, y], [x + 64, y], [x + 64, y + 64], [x, y + 64], [x, y]])  # level-0 px
        m = f["properties"]["measurements"]
        assert m["run attention"] == pytest.approx(float(scores[0][i]), rel=1e-5)
        assert m["run tile P(class 1)"] == pytest.approx(float(alone[i, 1]), rel=1e-5)
        assert m["run P(class 1)"] == pytest.approx(p1, abs=1e-6) and m["run fold"] == fold
        assert 0.25 <= m["tissue fraction"] <= 1.0


def test_exports_refuse_empty_and_mixed(tmp_path, tiny):
    from gigaslide.export import export_anndata, export_qupath

    with pytest.raises(GigaslideError, match="no encoded slides"):
        export_anndata([tmp_path], tmp_path / "x.h5ad")
    with pytest.raises(GigaslideError, match="no encoded slides"):
        export_qupath([tmp_path], tmp_path / "gj")
    other = tmp_path / "other"
    ff = store.load(tiny.out / "features" / "s0.h5")
    store.save(other / "features" / "z.h5", ff.features[:, :4], ff.coords, attrs={"encoder": "toy", "slide_id": "z"})
    with pytest.raises(GigaslideError, match="encoder"):
        export_anndata([tiny.out, other], tmp_path / "x.h5ad")
    assert not (tmp_path / "x.h5ad").exists()


def test_runs_with_the_same_folder_name_stay_apart(tiny, tmp_path):
    import shutil

    from gigaslide.export import load_runs

    a, b = tmp_path / "a" / "abmil", tmp_path / "b" / "abmil"
    shutil.copytree(tiny.run, a)
    shutil.copytree(tiny.run, b)
    (b / "predictions.csv").write_text((b / "predictions.csv").read_text().replace("s0,0,", "s0,1,"))
    runs = load_runs([a, b])
    assert [r.name for r in runs] == ["a/abmil", "b/abmil"]
    assert [r.predictions["s0"]["label"] for r in runs] == [0, 1]
    problems: list[str] = []
    assert load_runs([a, tmp_path / "nope"], problems)[0].name == "abmil" and "run folder not found" in problems[0]
    with pytest.raises(GigaslideError, match="run folder not found"):
        load_runs([tmp_path / "nope"])


def test_catalog_finds_a_slide_encoded_by_a_relative_path_from_another_folder(tmp_path, monkeypatch):
    """encode given `slides/a.tiff` in one folder, OUT elsewhere, viewer / export run from a third folder: the slide is
    found through the absolute path the features record (the manifest's relative one names no file from there)."""
    from gigaslide.encoders import build_encoder
    from gigaslide.export.catalog import scan
    from gigaslide.features.extract import encode_slides
    from gigaslide.testing import make_slide
    from gigaslide.tiling import TilingParams

    make_slide(tmp_path / "proj" / "slides" / "a.tiff", (1024, 768), seed=1)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    encode_slides(["slides/a.tiff"], tmp_path / "out", build_encoder("test_resnet", "random", seed=0),
                  TilingParams(mpp=1.0, tile_size=64), workers=0, precision="fp32")
    monkeypatch.chdir(tmp_path / "elsewhere")
    entries, _ = scan([tmp_path / "out"])
    assert entries["a"].slide_path == tmp_path / "proj" / "slides" / "a.tiff"
    assert entries["a"].missing == []


def test_catalog_finds_a_slide_tiled_by_a_relative_path_from_another_folder(tmp_path, monkeypatch):
    """`gigaslide tile slides/a.tiff --out OUT` (no encode: no manifest.json) then the viewer from another folder: the
    coords record the slide's absolute path (they recorded `slides/a.tiff`, which names no file from there)."""
    from gigaslide.cli.main import main
    from gigaslide.export.catalog import scan
    from gigaslide.testing import make_slide

    make_slide(tmp_path / "proj" / "slides" / "a.tiff", (1024, 768), seed=1)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["tile", "slides/a.tiff", "--out", str(tmp_path / "out"), "--mpp", "1.0", "--tile-size", "64"]) == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    entries, _ = scan([tmp_path / "out"])
    assert entries["a"].patches is not None and entries["a"].features is None
    assert entries["a"].slide_path == tmp_path / "proj" / "slides" / "a.tiff"


def test_tissue_of_tiles_of_another_size_is_not_taken_for_the_features_tiles(tmp_path):
    """The slide tiled again into OUT at 128 px after encoding at 64 px: tiles of the new grid whose corner is a
    features tile's corner gave it their tissue fraction (0.47 off here); unknown (NaN) instead, and unchanged
    when the coords file holds the features' own tiles."""
    from gigaslide.encoders import build_encoder
    from gigaslide.export import build_anndata
    from gigaslide.features.extract import encode_slides
    from gigaslide.testing import make_slide
    from gigaslide.tiling import TilingParams, load_grid, tile_slide

    p = make_slide(tmp_path / "a.tiff", (1024, 768), seed=1)
    out = tmp_path / "out"
    encode_slides([p], out, build_encoder("test_resnet", "random", seed=0), TilingParams(mpp=1.0, tile_size=64),
                  workers=0, precision="fp32")
    grid = load_grid(out / "patches" / "a.h5")
    a, _ = build_anndata([out])
    np.testing.assert_array_equal(a.obs["tissue"].to_numpy(), grid.tissue)  # the features' own tiles
    tile_slide(p, out, TilingParams(mpp=1.0, tile_size=128))
    other = load_grid(out / "patches" / "a.h5")
    t64 = {tuple(c): t for c, t in zip(grid.coords.tolist(), grid.tissue)}
    t128 = {tuple(c): t for c, t in zip(other.coords.tolist(), other.tissue)}
    assert any(abs(t64[c] - t128[c]) > 0.1 for c in set(t64) & set(t128))  # corners both grids have, other fractions
    a, _ = build_anndata([out])
    assert np.isnan(a.obs["tissue"].to_numpy()).all()


def test_a_run_trained_on_a_relative_features_path_is_not_called_gone_from_elsewhere(tiny, tmp_path, monkeypatch):
    """run.json keeps the option as typed (`--features out`) and the input's absolute path; the viewer, started in
    another folder, read the typed one and said the features folder was gone."""
    import shutil

    from gigaslide.export import load_run

    run = tmp_path / "run"
    shutil.copytree(tiny.run, run)
    feats = tmp_path / "work" / "out"
    feats.mkdir(parents=True)
    meta = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    meta.setdefault("config", {})["features"] = "out"
    meta.setdefault("inputs", {})["features"] = {"path": str(feats)}
    (run / "run.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)  # not the folder the run was started in
    assert not any("is gone" in p for p in load_run(run).problems)
    shutil.rmtree(feats)
    assert any(f"{feats} is gone" in p for p in load_run(run).problems)


def test_a_slide_file_given_as_the_output_folder_is_named_as_a_file(tmp_path):
    from gigaslide.export.catalog import scan_out_dir

    (tmp_path / "v0.tif").write_bytes(b"II*\x00")
    with pytest.raises(GigaslideError, match="is a file, not an encode output folder"):
        scan_out_dir(tmp_path / "v0.tif")


def test_a_run_trained_on_class_names_names_its_columns(tiny, tmp_path):
    """A MIL run on a labels.csv of class names records them (fold config.json): the exports' probability columns
    say 'P(tumor)', not 'P(class 1)', with the same numbers."""
    import shutil

    import anndata as ad

    from gigaslide.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(tiny.run, run)
    for cfg in run.glob("fold*/config.json"):
        meta = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**meta, "class_names": ["normal", "tumor"]}))
    out = tmp_path / "features.h5ad"
    assert main(["export", "anndata", str(tiny.out), "--out", str(out), "--runs", str(run)]) == 0
    a = ad.read_h5ad(out)
    assert "run P(class 1)" not in a.obs and "run tile P(class 0)" not in a.obs
    s2 = (a.obs["slide_id"] == "s2").to_numpy()
    _, p1, _ = _held_out(run, "s2")
    assert a.obs.loc[s2, "run P(tumor)"].to_numpy() == pytest.approx(p1, abs=1e-6)
    assert a.obs.loc[s2, "run P(normal)"].to_numpy() == pytest.approx(1 - p1, abs=1e-5)


def _cohort(out, n_slides: int, n_tiles: int = 30, dim: int = 512):  # noqa: ANN001, ANN202
    """``n_slides`` feature files written directly (seeded), no slides / patches: what the exports read."""
    rng = np.random.default_rng(0)
    feats = {}
    for i in range(n_slides):
        sid = f"c{i:03d}"
        feats[sid] = rng.standard_normal((n_tiles, dim)).astype(np.float32)
        coords = np.stack([np.arange(n_tiles) * 64, np.full(n_tiles, 64 * i)], 1)
        store.save(out / "features" / f"{sid}.h5", feats[sid], coords, coords_attrs={"patch_size_level0": 64},
                   attrs={"encoder": "toy", "mpp": 1.0, "tile_size": 64, "slide_id": sid})
    return feats


def test_a_damaged_feature_file_among_many_is_left_out_in_one_line(tmp_path):
    """One truncated file and one whose features fail their checksum among 12: the export stopped at the first with
    an error (QuPath after writing the files before it); now each is one note naming the file, the others exported,
    every row of X the features of the slide and tile obs names it."""
    import anndata as ad

    from gigaslide.export import export_anndata, export_qupath

    out = tmp_path / "out"
    feats = _cohort(out, 12)
    cut = out / "features" / "c003.h5"
    cut.write_bytes(cut.read_bytes()[:4000])
    flip = out / "features" / "c007.h5"
    import h5py

    with h5py.File(flip, "r") as f:
        at = f["features"].id.get_chunk_info(0).byte_offset + 100
    raw = bytearray(flip.read_bytes())
    raw[at] ^= 0xFF
    flip.write_bytes(bytes(raw))
    path, _, problems = export_anndata([out], tmp_path / "a.h5ad")
    bad = [p for p in problems if "left out" in p]
    assert len(bad) == 2 and str(cut) in bad[0] and str(flip) in bad[1] and all("\n" not in p for p in bad)
    a = ad.read_h5ad(path)
    kept = [s for s in feats if s not in ("c003", "c007")]
    assert list(a.obs["slide_id"].cat.categories) == kept and a.n_obs == 30 * len(kept)
    for s in kept:
        rows = (a.obs["slide_id"] == s).to_numpy()
        np.testing.assert_array_equal(a.X[rows], feats[s])
        assert list(a.obs_names[rows]) == [f"{s}:{t}" for t in range(30)]
    files, problems = export_qupath([out], tmp_path / "gj")
    assert sorted(f.stem for f in files) == kept
    assert [p for p in problems if "left out" in p] == bad


def test_anndata_export_holds_the_features_once(tmp_path):
    """The features were held twice (a list of every slide's arrays, then their concatenation): X is filled slide by
    slide instead, so the export's peak allocation is X and one slide more, not twice X."""
    import tracemalloc

    from gigaslide.export import build_anndata

    out = tmp_path / "out"
    _cohort(out, 24, n_tiles=40, dim=1024)
    build_anndata([out])  # imports and first-use caches outside the measure
    tracemalloc.start()
    try:
        a, _ = build_anndata([out])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert a.X.nbytes == 24 * 40 * 1024 * 4
    assert peak < 1.3 * a.X.nbytes, (peak, a.X.nbytes)


def test_listing_opens_no_file_and_exports_complete_entries(tiny, tmp_path, monkeypatch):
    """The catalogue lists slides from file names alone (the viewer's first page, thousands of slides); the exports
    complete each entry from the attributes store.load read (one HDF5 open of each features file for them)."""
    import h5py

    from gigaslide.export import build_anndata, catalog

    opened: list[str] = []
    real = h5py.File

    def spy(name, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(str(name))
        return real(name, *a, **k)

    monkeypatch.setattr(h5py, "File", spy)
    entries, _ = catalog.list_slides([tiny.out])
    assert sorted(entries) == [f"s{i}" for i in range(6)] and opened == []
    assert entries["s0"].features == tiny.out / "features" / "s0.h5" and entries["s0"].slide_path is None
    want, _ = catalog.scan([tiny.out])
    assert catalog.complete_entry(entries["s0"]) == want["s0"]
    opened.clear()
    build_anndata([tiny.out])
    feature_opens = [p for p in opened if "/features/" in p]
    assert sorted(set(feature_opens)) == sorted(str(tiny.out / "features" / f"s{i}.h5") for i in range(6))
    assert len(feature_opens) == 2 * 6  # its attributes and coords, then its features: never a third time


def test_runs_of_the_same_folder_name_are_stored_flat_in_the_h5ad(tiny, tmp_path):
    """Runs a/abmil and b/abmil: the '/' of their names made HDF5 groups (uns runs read back as {'a': {'abmil'}},
    obs columns nested; newer anndata refuses to write it). Stored as 'a:abmil' with the run's name kept."""
    import shutil
    import warnings

    import anndata as ad

    from gigaslide.export import export_anndata

    a_run, b_run = tmp_path / "a" / "abmil", tmp_path / "b" / "abmil"
    shutil.copytree(tiny.run, a_run)
    shutil.copytree(tiny.run, b_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # "Forward slashes will be disallowed in h5 stores"
        path, _, _ = export_anndata([tiny.out], tmp_path / "x.h5ad", runs=[a_run, b_run])
    a = ad.read_h5ad(path)
    runs = a.uns["gigaslide"]["runs"]
    assert sorted(runs) == ["a:abmil", "b:abmil"] and runs["a:abmil"]["name"] == "a/abmil"
    assert "a:abmil attention" in a.obs and "b:abmil fold" in a.obs


def test_anndata_obs_as_scanpy_users_group_by_it(tiny, tmp_path):
    """Two OUT_DIRs sharing slide ids: obs names stay unique (id@k); a run's slide label and held-out fold are
    categories (discrete groups / colours), slide_id too; uns reads back with the same plain values."""
    import shutil

    import anndata as ad

    from gigaslide.export import export_anndata

    other = tmp_path / "other"
    shutil.copytree(tiny.out, other)
    path, built, _ = export_anndata([tiny.out, other], tmp_path / "x.h5ad", runs=[tiny.run])
    a = ad.read_h5ad(path)
    n_tiles = sum(len(store.load(f, arrays=False)) for f in (tiny.out / "features").glob("*.h5"))
    assert a.obs_names.is_unique and "s0@1:0" in a.obs_names and a.n_obs == 2 * n_tiles
    for col in ("slide_id", "run label", "run fold"):
        assert str(a.obs[col].dtype) == "category", col
    assert sorted(a.obs["run fold"].cat.categories) == [0, 1] and a.obs["run fold"].notna().all()
    _, p1, label = _held_out(tiny.run, "s2")
    assert (a.obs.loc[a.obs["slide_id"] == "s2", "run label"] == label).all()
    u = a.uns["gigaslide"]
    assert u["slides"]["s0@1"]["features"] == str(other / "features" / "s0.h5")
    assert json.loads(json.dumps(built.uns["gigaslide"])) == built.uns["gigaslide"]  # plain values only
    np.testing.assert_array_equal(a.obsm["spatial"], built.obsm["spatial"])
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_h5ad_export_stopped_by_sigterm_leaves_no_file_behind(tmp_path):
    """SIGTERM (a batch system's time limit) while the .h5ad is written: no .h5ad, and no hidden temporary file as
    large as the features either (Python's default SIGTERM ended the process before atomic_path could remove it)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    _cohort(out, 3, dim=16)
    child = (
        "import os, signal, sys, time\n"
        "import anndata\n"
        "from gigaslide.export import export_anndata\n"
        "def partial(self, path, *a, **k):\n"
        "    open(path, 'wb').write(b'half an h5ad')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "import gigaslide.export.anndata_export as writer\n"
        "writer.write_h5ad = partial  # the .h5ad writer (anndata's write_h5ad through a Python file)\n"
        "export_anndata([sys.argv[1]], sys.argv[2])\n")
    target = tmp_path / "res" / "x.h5ad"
    r = subprocess.run([sys.executable, "-c", child, str(out), str(target)], capture_output=True, timeout=300)
    assert r.returncode == 143, r.stderr.decode()[-500:]
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_an_export_keeps_the_scores_of_one_slide_at_a_time(tiny, tmp_path, monkeypatch):
    """Per-tile MIL scores were kept for every slide until the export ended: memory grew with the cohort. Each
    slide's are dropped once its rows are built; the exported numbers are the same."""
    from gigaslide.cli.main import main
    from gigaslide.export import runs as export_runs

    kept: list[int] = []
    scores = export_runs.TileScorer.scores

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = scores(self, *a, **k)
        kept.append(len({key[1] for key in self._scores._values}))  # slides whose scores are held
        return out

    monkeypatch.setattr(export_runs.TileScorer, "scores", counted)
    assert main(["export", "qupath", str(tiny.out), "--runs", str(tiny.run), "--out", str(tmp_path / "q")]) == 0
    assert kept and max(kept) == 1, kept  # old code: 1, 2, ..., 6
    assert main(["export", "anndata", str(tiny.out), "--runs", str(tiny.run), "--out", str(tmp_path / "a.h5ad")]) == 0
    assert max(kept) == 1
