import numpy as np
import pytest
import torch
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.mil.heatmap import heatmap, localisation_auc
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, read_ground_truth
from gigaslide.mil.train import TrainConfig, save_model, train_fold

torch.set_num_threads(1)


def _tiles(tmp_path, size=32):
    d = tmp_path / "tiles"
    for cls, col in {"0": (230, 120, 180), "1": (90, 40, 140)}.items():
        (d / cls).mkdir(parents=True)
        Image.fromarray(np.full((size, size, 3), col, np.uint8)).save(d / cls / "t.png")
    return d


def _feats_from_gt(gt, rng, d=8):
    x = rng.normal(size=(len(gt), d)).astype(np.float32)
    x[gt[:, 3] == 1, :2] += 3.0
    return x


@pytest.fixture(scope="module")
def mosaic_and_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hm")
    out = tmp / "mosaic"
    build_mosaic(_tiles(tmp), out, MosaicConfig(slides=40, grid=10, tumor_fraction=(0.1, 0.2), seed=0), verbose=False)
    rng = np.random.default_rng(0)
    bags, ys = [], []
    for i in range(40):
        sid = f"mosaic_{i:04d}"
        gt = read_ground_truth(out / "ground_truth" / f"{sid}.csv")
        x = _feats_from_gt(gt, rng)
        store.save(tmp / "feats" / f"{sid}.h5", x, gt[:, :2], attrs={"encoder": "toy", "slide_id": sid},
                   coords_attrs={"patch_size_level0": 32})
        bags.append(torch.from_numpy(x))
        ys.append(int(gt[:, 3].any()))
    cfg = TrainConfig(model="abmil", epochs=10, lr=3e-3, hidden=16, patience=10)
    model, _ = train_fold(bags[:32], np.array(ys[:32]), bags[32:], np.array(ys[32:]), 8, 2, cfg)
    save_model(tmp / "run" / "fold0", model, cfg, in_dim=8, n_classes=2, extra={"encoder": "toy"})
    return tmp, out, ys


def test_heatmap_png_and_localisation(mosaic_and_model, cli, capsys):
    tmp, out, ys = mosaic_and_model
    pos = [i for i, y in enumerate(ys) if y][0]
    sid = f"mosaic_{pos:04d}"
    info = heatmap(out / "slides" / f"{sid}.tiff", tmp / "feats" / f"{sid}.h5", tmp / "run" / "fold0", tmp / "h.png",
                   thumb_size=256)
    assert info["localisation_auc"] is not None and info["localisation_auc"] > 0.9
    assert info["probs"][1] > 0.5
    im = Image.open(tmp / "h.png")
    assert im.size[0] > 300  # thumbnail + colour bar
    rc = cli(["heatmap", str(out / "slides" / f"{sid}.tiff"), "--features", str(tmp / "feats" / f"{sid}.h5"),
              "--model", str(tmp / "run" / "fold0"), "--out", str(tmp / "h2.png")])
    assert rc == 0 and "localisation AUC" in capsys.readouterr().out


def test_negative_slide_has_no_localisation(mosaic_and_model):
    tmp, out, ys = mosaic_and_model
    neg = f"mosaic_{ys.index(0):04d}"
    info = heatmap(out / "slides" / f"{neg}.tiff", tmp / "feats" / f"{neg}.h5", tmp / "run" / "fold0", tmp / "n.png",
                   thumb_size=128)
    assert info["localisation_auc"] is None and info["probs"][0] > 0.5


def test_heatmap_refuses_other_encoder(mosaic_and_model):
    tmp, out, _ = mosaic_and_model
    store.save(tmp / "other.h5", np.zeros((3, 8), np.float32), attrs={"encoder": "resnet18"})
    with pytest.raises(GigaslideError, match="encoder 'resnet18'"):
        heatmap(out / "slides" / "mosaic_0000.tiff", tmp / "other.h5", tmp / "run" / "fold0", tmp / "x.png")
    store.save(tmp / "dim.h5", np.zeros((3, 4), np.float32), attrs={"encoder": "toy"})
    with pytest.raises(GigaslideError, match="4-d but the model"):
        heatmap(out / "slides" / "mosaic_0000.tiff", tmp / "dim.h5", tmp / "run" / "fold0", tmp / "x.png")


def test_heatmap_refuses_another_slides_features(mosaic_and_model, cli, capsys):
    tmp, out, _ = mosaic_and_model
    with pytest.raises(GigaslideError, match="features of slide mosaic_0004 .*not of mosaic_0001.tiff"):
        heatmap(out / "slides" / "mosaic_0001.tiff", tmp / "feats" / "mosaic_0004.h5", tmp / "run" / "fold0",
                tmp / "w.png")
    assert not (tmp / "w.png").exists()
    rc = cli(["heatmap", str(out / "slides" / "mosaic_0001.tiff"), "--features", str(tmp / "feats" / "mosaic_0004.h5"),
              "--model", str(tmp / "run" / "fold0"), "--out", str(tmp / "w.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "mosaic_0004.h5" in err and "Traceback" not in err


def test_localisation_auc_golden():
    gt = np.array([[0, 0, 10, 1], [10, 0, 10, 0], [20, 0, 10, 0]])
    coords = gt[:, :2]
    assert localisation_auc(np.array([0.9, 0.1, 0.2]), coords, gt, 10) == 1.0
    assert localisation_auc(np.array([0.1, 0.9, 0.2]), coords, gt, 10) == 0.0
    assert np.isnan(localisation_auc(np.ones(3), coords, gt * [1, 1, 1, 0], 10))


def test_grid_layout_transmil_gets_its_cells_from_the_files_in_training_and_heatmaps(mosaic_and_model):
    """Bags hand each slide's grid cells to the model (a grid-layout TransMIL raises without them), in training,
    validation and the heatmap; the cells are the mosaic's own grid."""
    from gigaslide.mil.bags import Bags

    tmp, out, ys = mosaic_and_model
    files = [store.load(tmp / "feats" / f"mosaic_{i:04d}.h5") for i in range(40)]
    gt = read_ground_truth(out / "ground_truth" / "mosaic_0000.csv")
    np.testing.assert_array_equal(files[0].grid_cells(), (gt[:, :2] - gt[:, :2].min(0)) // 32)
    bags = Bags(files, 1 << 30)
    cfg = TrainConfig(model="transmil", epochs=2, hidden=16, model_kwargs={"layout": "grid"})
    model, _ = train_fold(bags.take(range(32)), np.array(ys[:32]), bags.take(range(32, 40)), np.array(ys[32:]), 8, 2, cfg)
    save_model(tmp / "run_tm" / "fold0", model, cfg, in_dim=8, n_classes=2, extra={"encoder": "toy"})
    sid = next(f"mosaic_{i:04d}" for i in range(40) if ys[i])
    info = heatmap(out / "slides" / f"{sid}.tiff", tmp / "feats" / f"{sid}.h5", tmp / "run_tm" / "fold0", tmp / "tm.png")
    assert info["n_tiles"] == len(read_ground_truth(out / "ground_truth" / f"{sid}.csv"))
    assert (tmp / "tm.png").stat().st_size > 0


def test_run_localisation_uses_each_slides_own_level0_tile_size(tmp_path):
    """A cohort of slides scanned at two resolutions has two level-0 tile sides (the same tile at the features'
    mpp); a run's localisation AUC labels each slide's tiles with its own side, as ``gigaslide heatmap`` does for
    that slide, not with the first slide's (s0, scanned at twice the others' resolution: its 64 px side put every
    other slide's tile centres one cell off)."""
    import h5py

    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.heatmap import run_localisation

    r = np.random.default_rng(0)
    rows, size0 = ["slide_id,label"], {}
    (tmp_path / "gt").mkdir()
    cells = np.array([(cx, cy) for cy in range(4) for cx in range(4)])
    for i in range(8):
        y, s = i % 2, (64 if i == 0 else 32)
        tum = np.zeros(16, np.int64)
        if y:
            tum[[5, 6, 9]] = 1
        x = r.normal(size=(16, 4)).astype(np.float32)
        x[tum == 1, 0] += 3.0
        coords = cells * s
        store.save(tmp_path / "feats" / f"s{i}.h5", x, coords, attrs={"encoder": "toy", "slide_id": f"s{i}"},
                   coords_attrs={"patch_size_level0": s})
        gt = np.column_stack([coords, np.full(16, s), tum])
        (tmp_path / "gt" / f"s{i}.csv").write_text("x,y,size,is_tumor\n" + "".join(
            ",".join(map(str, g)) + "\n" for g in gt))
        rows.append(f"s{i},{y}")
        size0[f"s{i}"] = s
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run_cv(tmp_path / "feats", tmp_path / "labels.csv", tmp_path / "run", cfg=TrainConfig(epochs=2, hidden=8), folds=2,
           n_bootstrap=0, verbose=False)
    own = []
    for k in range(2):
        with h5py.File(tmp_path / "run" / f"fold{k}" / "attention.h5", "r") as f:
            for sid in f:
                gt = read_ground_truth(tmp_path / "gt" / f"{sid}.csv")
                v = localisation_auc(f[sid]["scores"][:], f[sid]["coords"][:], gt, size0[sid])
                if not np.isnan(v):
                    own.append(v)
    res = run_localisation(tmp_path / "run", tmp_path / "gt", n_bootstrap=0)
    assert res["n_slides"] == len(own) == 4
    assert res["value"] == pytest.approx(float(np.mean(own)), abs=1e-12)


def test_the_tumour_outline_has_the_ground_truths_cells_not_the_feature_tiles(mosaic_and_model, tmp_path, monkeypatch):
    """Features tiled with 48 px level-0 tiles over a mosaic of 32 px cells: the tumour outline covers the ground
    truth's 32 px cells (it was drawn with the feature tiles' 48 px, half a cell too far right and down)."""
    import matplotlib.axes

    tmp, out, ys = mosaic_and_model
    sid = f"mosaic_{[i for i, y in enumerate(ys) if y][0]:04d}"
    gt = read_ground_truth(out / "ground_truth" / f"{sid}.csv")
    ff = store.load(tmp / "feats" / f"{sid}.h5")
    store.save(tmp_path / f"{sid}.h5", np.asarray(ff.features), gt[:, :2], attrs={"encoder": "toy", "slide_id": sid},
               coords_attrs={"patch_size_level0": 48})
    masks = []
    orig = matplotlib.axes.Axes.contour
    monkeypatch.setattr(matplotlib.axes.Axes, "contour",
                        lambda self, t, *a, **k: masks.append(np.array(t)) or orig(self, t, *a, **k))
    heatmap(out / "slides" / f"{sid}.tiff", tmp_path / f"{sid}.h5", tmp / "run" / "fold0", tmp_path / "h.png",
            thumb_size=160)
    (mask,) = masks
    ds = 320 / 160  # the 10 x 32 px mosaic drawn on a 160 px thumbnail
    want = np.zeros_like(mask)
    side = int(round(32 / ds))
    for x, y in gt[gt[:, 3] == 1][:, :2]:
        want[int(y / ds):int(y / ds) + side, int(x / ds):int(x / ds) + side] = 1
    assert mask.shape == (160, 160) and np.array_equal(mask, want)


def test_a_heatmap_of_nan_features_is_refused_naming_the_file(mosaic_and_model, cli, capsys):
    """One NaN tile made every attention and probability NaN: a blank heatmap 'class probabilities [nan, nan]'."""
    tmp, out, _ = mosaic_and_model
    ff = store.load(tmp / "feats" / "mosaic_0001.h5")
    x = np.asarray(ff.features).copy()
    x[2, 3] = np.nan
    store.save(tmp / "nan" / "mosaic_0001.h5", x, ff.coords, attrs={"encoder": "toy", "slide_id": "mosaic_0001"},
               coords_attrs={"patch_size_level0": 32})
    rc = cli(["heatmap", str(out / "slides" / "mosaic_0001.tiff"), "--features", str(tmp / "nan" / "mosaic_0001.h5"),
              "--model", str(tmp / "run" / "fold0"), "--out", str(tmp / "nan.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "mosaic_0001.h5: 1 tile(s) have NaN/inf features" in err
    assert not (tmp / "nan.png").exists()


def _three_class_run(tmp_path, model: str) -> list[torch.Tensor]:  # noqa: ANN001
    """A ``model`` fold trained on nine 6-tile bags of three classes (tmp_path/fold0), the first bag's features as
    slide s (tmp_path/s.h5, 256 px tiles) and a slide to draw on (tmp_path/s.tiff); returns the bags."""
    from gigaslide.testing import make_slide

    r = np.random.default_rng(0)
    bags = [torch.from_numpy(r.normal(size=(6, 4)).astype(np.float32) + (i % 3)) for i in range(9)]
    cfg = TrainConfig(model=model, epochs=5, hidden=16)
    trained, _ = train_fold(bags, np.arange(9) % 3, [], np.zeros(0, int), 4, 3, cfg)
    save_model(tmp_path / "fold0", trained, cfg, in_dim=4, n_classes=3)
    coords = np.array([[x * 256, y * 256] for x in range(3) for y in range(2)])
    store.save(tmp_path / "s.h5", bags[0].numpy(), coords, attrs={"slide_id": "s"},
               coords_attrs={"patch_size_level0": 256})
    make_slide(tmp_path / "s.tiff", (1024, 768))
    return bags


def test_a_multi_class_heatmap_is_titled_with_the_predicted_class(tmp_path, monkeypatch):
    """Three classes: the title named the last class's probability ('P(class 2) = 0.35') above CLAM-MB's attention
    branch of the predicted class (1): it names the predicted class."""
    from gigaslide.mil import heatmap as H

    _three_class_run(tmp_path, "clam_mb")
    titles = []
    monkeypatch.setattr(H, "draw_heatmap", lambda *a, **k: titles.append(k["title"]))
    info = H.heatmap(tmp_path / "s.tiff", tmp_path / "s.h5", tmp_path / "fold0", tmp_path / "h.png")
    k = int(np.argmax(info["probs"]))
    assert k != 2 and f"predicted class {k} (P = {info['probs'][k]:.3f})" in titles[0]


@pytest.mark.parametrize("ds", [2.66, 4.9, 2.7])
def test_a_lattice_of_tiles_leaves_no_seams_in_the_heatmap(ds):
    """256 px tiles at 2.66 level-0 px per thumb px: a fixed side of round(96.2) = 96 px from each truncated corner
    left 1 px stripes of bare thumbnail between tiles (3,840 px over 10 x 10 tiles); every tile keeps its place."""
    from gigaslide.mil.heatmap import paint_tiles

    coords = np.array([(x * 256, y * 256) for y in range(10) for x in range(10)], np.float64)
    n = int(10 * 256 / ds)
    grid = paint_tiles((n + 5, n + 5), coords, np.arange(100) / 100, 256, ds)
    assert not np.isnan(grid[:n - 1, :n - 1]).any()
    for k in (0, 37, 99):  # the centre of each tile shows its own value
        cx, cy = (coords[k] + 128) / ds
        assert grid[int(cy), int(cx)] == k / 100
    assert np.isnan(grid[n + 2:, :]).all()


def test_a_heatmap_is_written_in_the_format_its_name_says(tmp_path):
    """`--out a.jpg` used to get PNG bytes; an extension matplotlib cannot write is one line before any drawing."""
    from gigaslide.errors import GigaslideError
    from gigaslide.mil.heatmap import draw_heatmap

    thumb = np.full((40, 60, 3), 230, np.uint8)
    coords, vals = np.array([[0, 0], [64, 0]]), np.array([0.2, 0.9])
    magic = {"a.png": b"\x89PNG", "a.jpg": b"\xff\xd8", "a.pdf": b"%PDF", "a.svg": b"<?xml"}
    for name, head in magic.items():
        draw_heatmap(thumb, 4.0, coords, vals, 64.0, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(head), name
    with pytest.raises(GigaslideError, match=r"cannot write a heatmap as \.xyz"):
        draw_heatmap(thumb, 4.0, coords, vals, 64.0, tmp_path / "a.xyz")
    assert not (tmp_path / "a.xyz").exists()


def test_overlapping_tiles_each_cover_their_whole_footprint():
    """Tiles of 32 px at a 24 px step (overlap 8): the last tile drawn hid the right / bottom 8 px of its neighbours,
    so a planted tile showed as a 24 px box; each pixel now shows the mean of the tiles over it (as CLAM)."""
    from gigaslide.mil.heatmap import paint_tiles

    coords = np.array([(x * 24, y * 24) for y in range(4) for x in range(4)])
    v = np.zeros(16)
    v[5] = 1.0  # the tile at (24, 24)
    g = paint_tiles((110, 110), coords, v, 32, 1.0)
    ys, xs = np.nonzero(g > 0)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (24, 56, 24, 56)
    assert g[40, 40] == 1.0 and g[50, 50] == 0.25 and g[30, 40] == 0.5  # alone / under 4 tiles / under 2 tiles
    assert np.isnan(g[104:, :]).all() and not np.isnan(g[:104, :104]).any()


def test_each_thumbnail_axis_has_its_own_downsample(mosaic_and_model, tmp_path, monkeypatch):
    """A 263 x 60 slide's 256 x 58 thumbnail is 1.027 level-0 px per px across but 1.034 down: a tile at y = 48..56
    was painted with the x scale on rows 47..55, one row below its footprint (rows 46..54)."""
    from gigaslide.mil import heatmap as H
    from gigaslide.testing import make_slide

    tmp = mosaic_and_model[0]
    make_slide(tmp_path / "s.tiff", (263, 60))
    coords = np.array([[x * 8, y * 8] for y in range(7) for x in range(32)])
    x = np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32)
    store.save(tmp_path / "s.h5", x, coords, attrs={"encoder": "toy", "slide_id": "s"},
               coords_attrs={"patch_size_level0": 8})
    grids = []
    monkeypatch.setattr(H, "draw_heatmap", lambda thumb, ds, c, v, size0, *a, **k: grids.append(
        H.paint_tiles(thumb.shape[:2], c, np.arange(len(c), dtype=float), size0, ds)))
    H.heatmap(tmp_path / "s.tiff", tmp_path / "s.h5", tmp / "run" / "fold0", tmp_path / "h.png", thumb_size=256)
    g = grids[0]
    assert g.shape == (58, 256)
    k = 6 * 32  # the tile at (0, 48)
    rows = np.nonzero(g[:, 0] == k)[0]
    assert (rows.min(), rows.max() + 1) == (46, 54)


def test_percentiles_of_ties_one_tile_and_nan():
    """Ties share their mean rank (0.5 for all-equal scores); a bag of one tile was painted 0 (the coldest colour,
    though it holds all the attention) and is 0.5 like any tie; one NaN score made every percentile NaN (an empty
    map) and now only that tile is left unpainted."""
    from gigaslide.mil.heatmap import percentile

    assert percentile(np.array([0.7])).tolist() == [0.5]
    assert percentile(np.array([0.2, 0.2, 0.2])).tolist() == [0.5, 0.5, 0.5]
    assert percentile(np.array([3.0, 1.0, 1.0, 5.0])).tolist() == [2 / 3, 1 / 6, 1 / 6, 1.0]
    p = percentile(np.array([0.1, np.nan, 0.3]))
    assert p[0] == 0.0 and np.isnan(p[1]) and p[2] == 1.0


def test_a_multi_class_mean_pooling_heatmap_shows_the_predicted_classs_tile_margin(tmp_path, monkeypatch):
    """Mean pooling, three classes: the map was each tile's largest logit of any class, titled with the predicted
    class; it is the predicted class's logit minus the best other class's, per tile."""
    from gigaslide.mil import heatmap as H
    from gigaslide.mil.train import load_model

    bags = _three_class_run(tmp_path, "mean")
    vals = []
    monkeypatch.setattr(H, "draw_heatmap", lambda thumb, ds, c, v, *a, **k: vals.append(v))
    info = H.heatmap(tmp_path / "s.tiff", tmp_path / "s.h5", tmp_path / "fold0", tmp_path / "h.png")
    k = int(np.argmax(info["probs"]))
    m, _ = load_model(tmp_path / "fold0")
    with torch.no_grad():
        inst = m(bags[0])["instance_logits"].numpy()
    want = H.percentile(inst[:, k] - np.delete(inst, k, 1).max(1))
    assert np.allclose(vals[0], want)
    assert not np.allclose(H.percentile(inst.max(1)), want)  # the old map differs on this bag
