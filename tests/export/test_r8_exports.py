"""Round 8 (lens U): what the exports write, checked where the tiny project's numbers cannot tell a slip apart -- a
level-0 tile side other than the tile size, x != y, a QuPath object type other than the default, folds not from 0."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gigaslide.features import store

COORDS = np.array([[512, 0], [0, 1024], [1536, 512], [2048, 1536]])  # level-0 px, x != y


def _slide(out, sid: str = "a", n: int = len(COORDS)):  # noqa: ANN001, ANN202
    """A feature file of 256 px tiles at 0.5 µm/px cut from a 0.25 µm/px slide: 512 level-0 px a side."""
    feats = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    store.save(out / "features" / f"{sid}.h5", feats, COORDS[:n], attrs={"encoder": "x", "mpp": 0.5, "tile_size": 256,
                                                                         "slide_id": sid},
               coords_attrs={"patch_size_level0": 512, "patch_size": 256, "target_mpp": 0.5, "level0_mpp": 0.25})
    return feats


def test_qupath_tiles_are_level0_squares_of_the_object_type_asked_for(tmp_path):
    """Each tile is the square of its level-0 corner and level-0 side (512 px here: 256 px at 0.5 µm/px of a
    0.25 µm/px slide, not the 256 px tile size), as the QuPath object type given (detection: QuPath's measurement
    maps and classifiers work on detections), named by its row."""
    from gigaslide.export import export_qupath

    out = tmp_path / "out"
    _slide(out)
    files, _ = export_qupath([out], tmp_path / "gj", object_type="detection")
    gj = json.loads(files[0].read_text())
    assert len(gj["features"]) == len(COORDS)
    for i, (f, (x, y)) in enumerate(zip(gj["features"], COORDS.tolist())):
        assert f["geometry"] == {"type": "Polygon", "coordinates": [[[x, y], [x + 512, y], [x + 512, y + 512],
                                                                     [x, y + 512], [x, y]]]}
        assert f["properties"]["objectType"] == "detection" and f["properties"]["name"] == f"tile {i}"
    rec = json.loads((tmp_path / "gj" / "provenance.json").read_text())
    assert rec["object_type"] == "detection" and rec["tile_size"] == 256 and rec["mpp"] == 0.5


def test_anndata_obs_x_y_spatial_and_the_level0_tile_side(tmp_path):
    """obs x / y are the tile's level-0 x and y (not swapped), obsm['spatial'] the same corners, and uns records the
    level-0 side of a tile (512 px) besides the tile size at the features' mpp (256 px)."""
    from gigaslide.export import build_anndata

    out = tmp_path / "out"
    feats = _slide(out)
    a, _ = build_anndata([out])
    np.testing.assert_array_equal(a.obs["x"].to_numpy(), COORDS[:, 0])
    np.testing.assert_array_equal(a.obs["y"].to_numpy(), COORDS[:, 1])
    np.testing.assert_array_equal(a.obsm["spatial"], COORDS)
    np.testing.assert_array_equal(a.X, feats)
    u = a.uns["gigaslide"]
    assert u["slides"]["a"]["tile_size_level0"] == 512 and u["tile_size"] == 256 and u["mpp"] == 0.5


def test_fold_and_label_categories_are_the_folds_and_labels_present(tmp_path):
    """A cohort whose slides were tested in folds 1 and 3 (of a 4-fold run) and all have label 1: the fold column's
    categories are 1 and 3 and each slide's rows hold its own fold; the label column's single category is 1."""
    from gigaslide.evaluation.slides import write_predictions
    from gigaslide.export import build_anndata

    out = tmp_path / "out"
    _slide(out, "a", 2)
    _slide(out, "b", 3)
    run = tmp_path / "run"
    run.mkdir()
    write_predictions(run / "predictions.csv", ["a", "b"], [1, 1], np.array([[0.2, 0.8], [0.4, 0.6]]), [3, 1])
    a, _ = build_anndata([out], runs=[run])
    fold, label = a.obs["run fold"], a.obs["run label"]
    assert list(fold.cat.categories) == [1, 3] and list(label.cat.categories) == [1]
    assert fold.astype(int).tolist() == [3, 3, 1, 1, 1] and label.astype(int).tolist() == [1] * 5
    assert a.obs["run P(class 1)"].to_numpy() == pytest.approx([0.8, 0.8, 0.6, 0.6, 0.6])


@pytest.mark.parametrize("n, names", [(0, ["a"]), (3, []), (5, ["x", "ü\\n\t", "1e300"])])
def test_streamed_geojson_is_json_dumps_for_empty_and_odd_inputs(tmp_path, n, names):
    """The GeoJSON writer formats each tile's text itself: the bytes are still ``json.dumps`` of the collection for no
    tiles, no measurements, names JSON must escape, and numbers whose shortest form is in exponent notation."""
    from gigaslide.export.qupath import tiles_geojson, write_tiles_geojson

    coords = np.array([[3e16, 0], [1, 2], [0.5, 1e-7], [7, 7], [2**53, 9]], np.float64)[:n]
    meas = {k: np.array([1e300, -2.5e-8, 0.1, np.nan, 3.0])[:n] * (i + 1) for i, k in enumerate(names)}
    for object_type in ("annotation", 'odd "type"'):
        write_tiles_geojson(tmp_path / "t.geojson", coords, 1 / 3, meas, object_type)
        want = json.dumps(tiles_geojson(coords, 1 / 3, meas, object_type)).encode()
        assert (tmp_path / "t.geojson").read_bytes() == want
