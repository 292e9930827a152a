import numpy as np
import torch
from PIL import Image

from gigaslide.features import store
from gigaslide.mil import heatmap as heatmap_module
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, read_ground_truth
from gigaslide.mil.train import TrainConfig, save_model, train_fold

torch.set_num_threads(1)


def test_heatmap_names_the_classes_of_a_run_with_class_names(tmp_path, cli, capsys, monkeypatch):
    """A fold trained on a labels.csv with class names prints each probability with its class's name."""
    tiles = tmp_path / "tiles"
    for cls, col in {"0": (230, 120, 180), "1": (90, 40, 140)}.items():
        (tiles / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), col, np.uint8)).save(tiles / cls / "t.png")
    build_mosaic(tiles, tmp_path / "m", MosaicConfig(slides=2, grid=6, seed=0), verbose=False)
    gt = read_ground_truth(tmp_path / "m" / "ground_truth" / "mosaic_0000.csv")
    x = np.random.default_rng(0).normal(size=(len(gt), 4)).astype(np.float32)
    store.save(tmp_path / "f.h5", x, gt[:, :2], attrs={"encoder": "toy", "slide_id": "mosaic_0000"},
               coords_attrs={"patch_size_level0": 32})
    cfg = TrainConfig(model="mean", epochs=1, hidden=8)
    bags = [torch.from_numpy(x)] * 2
    model, _ = train_fold(bags, np.array([0, 1]), [], np.array([], int), 4, 2, cfg)
    save_model(tmp_path / "fold0", model, cfg, in_dim=4, n_classes=2,
               extra={"encoder": "toy", "class_names": ["normal_tissue", "tumor_tissue"]})
    rc = cli(["heatmap", str(tmp_path / "m" / "slides" / "mosaic_0000.tiff"), "--features", str(tmp_path / "f.h5"),
              "--model", str(tmp_path / "fold0"), "--out", str(tmp_path / "h.png"), "--thumb-size", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "class probabilities normal_tissue: 0." in out and ", tumor_tissue: 0." in out, out
    titles = []  # the picture's title names the class too ('P(tumor_tissue) = 0.5', not 'P(class 1)')
    monkeypatch.setattr(heatmap_module, "draw_heatmap", lambda *a, **k: titles.append(k["title"]))
    info = heatmap_module.heatmap(tmp_path / "m" / "slides" / "mosaic_0000.tiff", tmp_path / "f.h5", tmp_path / "fold0",
                                  tmp_path / "h2.png")
    assert f"P(tumor_tissue) = {info['probs'][1]:.3f}" in titles[0], titles
