"""The mosaic options the slide-SSL benchmark needs: tumour arrangement and the context task."""
import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from gigaslide.cli.main import main
from gigaslide.errors import GigaslideError
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, read_ground_truth, scatter_region, tissue_mask


def _tiles(tmp_path, size=16):
    d = tmp_path / "tiles"
    for cls, col in {"0": (230, 120, 180), "1": (90, 40, 140)}.items():
        (d / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((size, size, 3), col, np.uint8)).save(d / cls / f"t{i}.png")
    return d


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
