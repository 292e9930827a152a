import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from gigaslide.errors import GigaslideError
from gigaslide.mil.mosaic import (MosaicConfig, build_mosaic, grow_region, parse_range, read_ground_truth,
                                  tissue_mask, tumor_labels_for_coords)
from gigaslide.slides import open_slide
from gigaslide.testing import shared_data_dir


def _tile_folder(tmp_path, n=6, size=32):
    d = tmp_path / "tiles"
    colours = {"0": (230, 120, 180), "1": (90, 40, 140)}  # normal pink, tumour dark purple
    for cls, col in colours.items():
        (d / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), col, np.uint8)).save(d / cls / f"t{i}.png")
    return d


def test_masks_and_regions_are_contiguous():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = tissue_mask(24, 0.45, rng)
        assert ndimage.label(m)[1] == 1 and 0.25 < m.mean() <= 0.46
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()
        r = grow_region(m, 20, rng)
        assert r.sum() == 20 and (r <= m).all()
        assert ndimage.label(r)[1] == 1  # 4-connected: one piece


def test_parse_range():
    assert parse_range("0.02-0.2") == (0.02, 0.2)
    assert parse_range("0.1") == (0.1, 0.1)
    with pytest.raises(GigaslideError):
        parse_range("abc")
    with pytest.raises(GigaslideError):
        parse_range("0.5-0.1")


def test_build_mosaic_layout_and_ground_truth(tmp_path):
    tiles = _tile_folder(tmp_path)
    out = tmp_path / "mosaic"
    cfg = MosaicConfig(slides=6, positive_fraction=0.5, tumor_fraction=(0.1, 0.1), grid=10, seed=1)
    meta = build_mosaic(tiles, out, cfg, verbose=False)
    assert meta["n_positive"] == 3 and meta["tile_size"] == 32
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 6 and sum(int(r["label"]) for r in rows) == 3
    for r in rows:
        gt = read_ground_truth(out / "ground_truth" / f"{r['slide_id']}.csv")
        n_tum = int(gt[:, 3].sum())
        assert n_tum == int(r["n_tumor_tiles"]) and len(gt) == int(r["n_tissue_tiles"])
        assert (n_tum > 0) == (r["label"] == "1")
        if n_tum:
            assert n_tum == round(0.1 * len(gt))
        s = open_slide(out / "slides" / f"{r['slide_id']}.tiff")
        assert s.dimensions == (320, 320) and s.mpp == pytest.approx(0.97, abs=1e-3)
        # pixels agree with the ground truth: tumour tiles are dark purple, normal pink, background white
        px = s.read_region((0, 0), (320, 320), 0.97)
        for x, y, size, t in gt[:10]:
            c = px[y + size // 2, x + size // 2].astype(int)
            assert (abs(c[0] - 90) < 25) if t else (abs(c[0] - 230) < 25)
        assert px[2, 2].min() > 230
    mtime = (out / "slides" / "mosaic_0000.tiff").stat().st_mtime_ns
    build_mosaic(tiles, out, cfg, verbose=False)
    assert (out / "slides" / "mosaic_0000.tiff").stat().st_mtime_ns == mtime  # resumed


def test_tumor_labels_for_coords():
    gt = np.array([[0, 0, 96, 0], [96, 0, 96, 1], [0, 96, 96, 0]])
    coords = np.array([[96, 0], [0, 0], [100, 10], [0, 96]])
    assert tumor_labels_for_coords(gt, coords, 96).tolist() == [1, 0, 1, 0]


def test_bad_tile_folder(tmp_path, cli, capsys):
    assert cli(["mosaic", "--tiles", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no class folder '0/'" in capsys.readouterr().err


@pytest.mark.realdata
def test_pcam_mosaic_cli(tmp_path, cli):
    data = shared_data_dir()
    if data is None:
        pytest.skip("no shared data")
    rc = cli(["mosaic", "--tiles", str(data / "tiles/pcam/train"), "--out", str(tmp_path / "m"), "--slides", "2",
              "--grid", "8", "--tumor-fraction", "0.2"])
    assert rc == 0
    s = open_slide(tmp_path / "m" / "slides" / "mosaic_0000.tiff")
    assert s.dimensions == (768, 768)
    from gigaslide.tiling import segment_tissue

    tm, _ = segment_tissue(s)
    gt = read_ground_truth(tmp_path / "m" / "ground_truth" / "mosaic_0000.csv")
    cells = np.zeros((768, 768), bool)
    for x, y, size, _ in gt:
        cells[y:y + size, x:x + size] = True
    m = np.asarray(Image.fromarray(tm.mask).resize((768, 768), Image.NEAREST)) if tm.mask.shape != (768, 768) else tm.mask
    assert m.mean() > 0.1  # the spine's tissue detector finds the mosaic's tissue ...
    assert cells[m].mean() > 0.9  # ... and almost nothing on the glass
