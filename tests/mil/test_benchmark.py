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
    rc = cli(["benchmark", "--encoders", "test_resnet", "--weights", "random", "--tiles", str(tiles),
              "--slides", str(tmp_path / "mosaic"), "--tile-size", "64", "--folds", "2", "--epochs", "2",
              "--bootstrap", "20", "--threads", "1", "--out", str(tmp_path / "bench")])
    assert rc == 0, capsys.readouterr().err
    lb = json.loads((tmp_path / "bench" / "leaderboard.json").read_text())["rows"][0]
    assert lb["encoder"] == "test_resnet"
    assert lb["tile"]["linear"]["auc"]["value"] > 0.9  # solid colours: trivially separable even with random weights
    ev = json.loads((tmp_path / "bench" / "test_resnet" / "mil" / "evaluation.json").read_text())
    assert ev["n_slides"] == 8  # the leaderboard reports the MIL run it made, on every mosaic slide
    assert lb["slide"]["auc"] == pytest.approx({k: ev["metrics"]["auc"][k] for k in lb["slide"]["auc"]}, nan_ok=True)
    assert lb["localisation"]["n_slides"] >= 1
    assert "| test_resnet |" in (tmp_path / "bench" / "leaderboard.md").read_text()
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
