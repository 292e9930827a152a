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
    assert sorted(p.name for p in out.iterdir()) == [f"s{i}.geojson" for i in range(6)]
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
