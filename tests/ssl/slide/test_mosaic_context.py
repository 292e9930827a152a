"""The mosaic options the slide-SSL benchmark needs: tumour arrangement and the context task."""
import csv

import numpy as np
import pytest
from scipy import ndimage

from gigaslide.cli.main import main
from gigaslide.errors import GigaslideError
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, read_ground_truth, scatter_region, tissue_mask
from gigaslide.testing import make_tile_folder


def _tiles(tmp_path, size=16):
    return make_tile_folder(tmp_path / "tiles", 3, size=size, classes=("0", "1"), noise=0)


def _pieces(gt):
    cell = int(gt[0, 2])
    grid = np.zeros((64, 64), bool)
    for x, y, _, t in gt:
        grid[y // cell, x // cell] = bool(t)
    return ndimage.label(grid)[1]


def test_scatter_region_is_a_random_subset():
    rng = np.random.default_rng(0)
    m = tissue_mask(20, 0.5, rng)
    r = scatter_region(m, 30, rng)
    assert r.sum() == 30 and (r <= m).all() and ndimage.label(r)[1] > 5  # not one piece


def test_context_task_same_fraction_labels_by_arrangement(tmp_path):
    out = tmp_path / "m"
    build_mosaic(_tiles(tmp_path), out, MosaicConfig(slides=8, grid=16, tumor_fraction=(0.25, 0.25), seed=0, task="context"),
                 verbose=False)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert {r["label"] for r in rows} == {"0", "1"}
    for r in rows:
        gt = read_ground_truth(out / "ground_truth" / f"{r['slide_id']}.csv")
        assert abs(float(r["tumor_fraction"]) - 0.25) < 0.02  # both classes hold tumour at the same fraction
        assert r["arrangement"] == ("contiguous" if r["label"] == "1" else "scattered")
        assert (_pieces(gt) == 1) == (r["label"] == "1")


def test_arrangement_option_and_cli(tmp_path, capsys):
    tiles = _tiles(tmp_path)
    assert main(["mosaic", "--tiles", str(tiles), "--out", str(tmp_path / "s"), "--slides", "4", "--grid", "16",
                 "--tumor-fraction", "0.3", "--arrangement", "scattered"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "labels.csv")))
    pos = [r for r in rows if r["label"] == "1"]
    assert pos and all(r["arrangement"] == "scattered" for r in pos)
    assert all(_pieces(read_ground_truth(tmp_path / "s" / "ground_truth" / f"{r['slide_id']}.csv")) > 1 for r in pos)
    assert all(r["arrangement"] == "none" and r["n_tumor_tiles"] == "0" for r in rows if r["label"] == "0")
    assert main(["mosaic", "--tiles", str(tiles), "--out", str(tmp_path / "x"), "--slides", "4", "--task", "shape"]) == 2
    assert "--task" in capsys.readouterr().err
    with pytest.raises(GigaslideError, match="--arrangement"):
        build_mosaic(tiles, tmp_path / "y", MosaicConfig(slides=4, grid=8, arrangement="ring"), verbose=False)


def test_tiling_from_the_mosaic_tissue_annotations_keeps_exactly_the_tissue_cells(tmp_path, capsys):
    """Tissue detection keeps a share of a slide's cells that depends on their content and arrangement (a cue a bag
    mean can read); the mosaic's own tissue GeoJSON gives every tissue cell and nothing else, in either class."""
    import json

    from gigaslide.tiling import load_grid

    out, tiles = tmp_path / "m", _tiles(tmp_path)
    cfg = MosaicConfig(slides=4, grid=12, tumor_fraction=(0.25, 0.25), seed=0, task="context")
    build_mosaic(tiles, out, cfg, verbose=False)
    doc = json.loads((out / "tissue" / "mosaic_0000.geojson").read_text())
    assert [f["properties"]["classification"]["name"] for f in doc["features"]] == ["Tissue", "Tumor"]
    assert main(["tile", str(out / "slides"), "--out", str(tmp_path / "t"), "--mpp", "0.97", "--tile-size", "16",
                 "--min-tissue", "0.5", "--tissue-from", str(out / "tissue")]) == 0
    assert main(["tile", str(out / "slides"), "--out", str(tmp_path / "tum"), "--mpp", "0.97", "--tile-size", "16",
                 "--min-tissue", "0.5", "--tissue-from", str(out / "tissue"), "--tissue-classes", "Tumor"]) == 0
    for sid in (f"mosaic_{i:04d}" for i in range(4)):
        gt = read_ground_truth(out / "ground_truth" / f"{sid}.csv")
        grid = load_grid(tmp_path / "t" / "patches" / f"{sid}.h5")
        assert sorted(map(tuple, grid.coords.tolist())) == sorted(map(tuple, gt[:, :2].tolist()))
        np.testing.assert_allclose(grid.tissue, 1.0)
        tum = load_grid(tmp_path / "tum" / "patches" / f"{sid}.h5")
        assert sorted(map(tuple, tum.coords.tolist())) == sorted(map(tuple, gt[gt[:, 3] == 1, :2].tolist()))
    before = (out / "tissue" / "mosaic_0002.geojson").read_text()
    (out / "tissue" / "mosaic_0002.geojson").unlink()  # rewritten from the ground truth when the mosaic resumes
    build_mosaic(tiles, out, cfg, verbose=False)
    assert (out / "tissue" / "mosaic_0002.geojson").read_text() == before
