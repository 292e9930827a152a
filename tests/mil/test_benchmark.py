import json

import numpy as np
import pytest
import torch
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.mil.benchmark import run_benchmark
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic

torch.set_num_threads(1)


def _tile_split(root, n=12, size=64, seed=0):
    r = np.random.default_rng(seed)
    for cls, col in {"0": (230, 120, 180), "1": (90, 40, 140)}.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            px = np.clip(np.array(col) + r.integers(-20, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / cls / f"t{i}.png")


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path, cli, capsys):
    """mosaic -> spine encode (test_resnet, random) -> tile probes + ABMIL CV + localisation -> leaderboard -> heatmap."""
    tiles = tmp_path / "tiles"
    _tile_split(tiles / "train", seed=0)
    _tile_split(tiles / "valid", seed=1)
    build_mosaic(tiles / "train", tmp_path / "mosaic", MosaicConfig(slides=8, grid=8, tumor_fraction=(0.3, 0.3), seed=0),
                 verbose=False)
    rc = cli(["benchmark", "--encoders", "test_resnet,test_vit", "--weights", "random", "--tiles", str(tiles),
              "--slides", str(tmp_path / "mosaic"), "--tile-size", "64", "--folds", "2", "--epochs", "2",
              "--bootstrap", "20", "--threads", "1", "--out", str(tmp_path / "bench")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Paired vs `test_resnet`" in printed.out  # the comparison is printed, not only written
    lb = json.loads((tmp_path / "bench" / "leaderboard.json").read_text())["rows"][0]
    assert lb["encoder"] == "test_resnet"
    assert lb["tile"]["linear"]["auc"]["value"] > 0.9  # solid colours: trivially separable even with random weights
    ev = json.loads((tmp_path / "bench" / "test_resnet" / "mil" / "evaluation.json").read_text())
    assert ev["n_slides"] == 8  # the leaderboard reports the MIL run it made, on every mosaic slide
    assert lb["slide"]["auc"] == pytest.approx({k: ev["metrics"]["auc"][k] for k in lb["slide"]["auc"]}, nan_ok=True)
    assert lb["localisation"]["n_slides"] >= 1
    md = (tmp_path / "bench" / "leaderboard.md").read_text()
    assert "| test_resnet |" in md and "| test_vit |" in md and "Paired vs `test_resnet`" in md
    paired = json.loads((tmp_path / "bench" / "leaderboard.json").read_text())["paired_vs_first"]
    assert list(paired) == ["test_vit: tile linear", "test_vit: tile 20-NN", "test_vit: slide abmil"]
    assert (tmp_path / "bench" / "leaderboard.png").stat().st_size > 1000
    feats = sorted((tmp_path / "bench" / "test_resnet" / "slides" / "features").glob("*.h5"))
    assert len(feats) == 8
    sid = feats[0].stem
    rc = cli(["heatmap", str(tmp_path / "mosaic" / "slides" / f"{sid}.tiff"), "--features", str(feats[0]),
              "--model", str(tmp_path / "bench" / "test_resnet" / "mil" / "fold0"), "--out", str(tmp_path / "h.png"),
              "--thumb-size", "128"])
    assert rc == 0 and (tmp_path / "h.png").is_file()


def test_benchmark_bad_inputs(tmp_path):
    with pytest.raises(GigaslideError, match="nothing to benchmark"):
        run_benchmark(["test_resnet"], tmp_path / "o")
    with pytest.raises(GigaslideError, match="no labels.csv"):
        run_benchmark(["test_resnet"], tmp_path / "o", slides=tmp_path)
    with pytest.raises(GigaslideError, match="no train/"):
        run_benchmark(["test_resnet"], tmp_path / "o", tiles=tmp_path)


def test_the_leaderboard_compares_each_encoder_with_the_first_paired(tmp_path):
    """Tile probes on the same recorded test tiles and MIL predictions on the same slides -> Δ vs the first encoder
    (a's minus b's, from what each encoder's folder saved)."""
    from gigaslide.evaluation.metrics import METRICS
    from gigaslide.evaluation.slides import read_predictions, write_predictions
    from gigaslide.evaluation.tiles import evaluate_tile_features, saved_predictions
    from gigaslide.features import store
    from gigaslide.mil.benchmark import paired_vs_first

    r = np.random.default_rng(0)
    y, yt = np.arange(120) % 2, np.arange(80) % 2
    slides_y = np.arange(30) % 2
    for name, signal in (("first", 0.0), ("runs_x_encoder", 2.0)):
        d = tmp_path / name
        tr = r.normal(size=(120, 4)) + signal * y[:, None]
        te = r.normal(size=(80, 4)) + signal * yt[:, None]
        store.save(d / "tr.h5", tr.astype(np.float32), labels=y, attrs={"encoder": name})
        store.save(d / "te.h5", te.astype(np.float32), labels=yt, attrs={"encoder": name, "tiles_fingerprint": "t1"})
        evaluate_tile_features(store.load(d / "tr.h5"), store.load(d / "te.h5"), ["linear", "knn"], n_bootstrap=20,
                               out=d / "tile_report")
        p1 = 1 / (1 + np.exp(-(signal * (2 * slides_y - 1) + r.normal(size=30))))
        write_predictions(d / "mil" / "predictions.csv", [f"s{i}" for i in range(30)], slides_y,
                          np.stack([1 - p1, p1], 1), np.arange(30) % 3)
    rows = [{"encoder": "first", "tile": {}, "slide": {"model": "abmil"}},
            {"encoder": "runs/x/encoder", "tile": {}, "slide": {"model": "abmil"}}]  # a path, as users pass exports
    diffs = paired_vs_first(rows, tmp_path, n_bootstrap=50, seed=0)
    assert list(diffs) == ["runs/x/encoder: tile linear", "runs/x/encoder: tile 20-NN", "runs/x/encoder: slide abmil"]
    a = saved_predictions(tmp_path / "runs_x_encoder" / "tile_report")
    b = saved_predictions(tmp_path / "first" / "tile_report")
    want = METRICS["auc"](yt, a["test_probs"]["knn"]) - METRICS["auc"](yt, b["test_probs"]["knn"])
    assert diffs["runs/x/encoder: tile 20-NN"]["auc"]["diff"] == pytest.approx(want)
    pa, pb = read_predictions(tmp_path / "runs_x_encoder" / "mil"), read_predictions(tmp_path / "first" / "mil")
    want = METRICS["auc"](pa.labels, pa.probs) - METRICS["auc"](pb.labels, pb.probs)
    assert diffs["runs/x/encoder: slide abmil"]["auc"]["diff"] == pytest.approx(want, abs=1e-5)
    assert diffs["runs/x/encoder: tile linear"]["balanced_accuracy"]["ci_low"] > 0  # signal vs none
    assert paired_vs_first(rows[:1], tmp_path, n_bootstrap=10, seed=0) == {}


def test_two_runs_exports_get_their_own_folders(tmp_path):
    """`--encoders runs/a/encoder,runs/b/encoder` (the usual case): each export its own folder in OUT."""
    from gigaslide.mil.benchmark import _safe, split_weights

    assert _safe("runs/a/encoder") != _safe("runs/b/encoder")
    assert _safe("/abs/runs/a/encoder") == "abs_runs_a_encoder" and _safe("resnet18") == "resnet18"
    # an SSL run beside its from-scratch baseline in one leaderboard: own weights per encoder, own folders
    assert split_weights("runs/a/encoder@random") == ("runs/a/encoder", "random")
    assert split_weights("resnet18") == ("resnet18", None) and split_weights("x@") == ("x@", None)
    assert _safe("runs/a/encoder@random") != _safe("runs/a/encoder")
    (tmp_path / "t" / "train").mkdir(parents=True)
    with pytest.raises(GigaslideError, match="would share the folder"):
        run_benchmark(["resnet18", "resnet18"], tmp_path / "o", tiles=tmp_path / "t")
    assert not (tmp_path / "o").exists()  # refused before any work


def test_the_leaderboard_names_the_mil_model_it_ran(tmp_path):
    """`benchmark --model transmil`: the table's and the plot's slide column say TRANSMIL (they said ABMIL whatever
    model ran)."""
    from gigaslide.mil.benchmark import leaderboard_markdown, plot_leaderboard

    m = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}
    rows = [{"encoder": "a", "dim": 8, "slide": {"model": "transmil", "auc": m, "balanced_accuracy": m}}]
    header = leaderboard_markdown(rows).splitlines()[0]
    assert "slide TRANSMIL AUC" in header and "ABMIL" not in header
    assert "slide ABMIL AUC" in leaderboard_markdown([{**rows[0], "slide": {**rows[0]["slide"], "model": "abmil"}}])
    import matplotlib.pyplot as plt

    seen = []
    orig = plt.Axes.bar
    try:
        plt.Axes.bar = lambda self, *a, label=None, **k: seen.append(label) or orig(self, *a, label=label, **k)
        plot_leaderboard(rows, tmp_path / "l.png")
    finally:
        plt.Axes.bar = orig
    assert "slide TRANSMIL AUC" in seen and not any("ABMIL" in str(s) for s in seen)
