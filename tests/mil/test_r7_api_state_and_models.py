"""Round 7: the Python API leaves the caller's global state alone, and a saved model / features pair is checked."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.mil.train import TrainConfig, _build, check_features_fit, load_model, save_model, train_fold


def _bags(n=8, d=4, seed=0):
    rng = np.random.default_rng(seed)
    bags = [torch.from_numpy(rng.normal(size=(6, d)).astype(np.float32) + (i % 2)) for i in range(n)]
    return bags, np.array([i % 2 for i in range(n)])


def test_train_fold_gives_the_callers_random_streams_back():
    """train_fold's torch.manual_seed(cfg.seed) reset the caller's torch generator: a notebook's torch.rand after
    each call drew the same numbers (the fold's seed), whatever the notebook had seeded."""
    bags, y = _bags()
    cfg = TrainConfig(model="abmil", epochs=2, hidden=8, patience=2, min_epochs=1, seed=0)
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    expect_t, expect_np, expect_py = torch.rand(3), np.random.rand(), random.random()
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    m1, _ = train_fold(bags[:6], y[:6], bags[6:], y[6:], 4, 2, cfg)
    assert torch.equal(torch.rand(3), expect_t)
    assert np.random.rand() == expect_np and random.random() == expect_py
    torch.manual_seed(555)  # the fold's own seed decides its model, not the caller's stream
    m2, _ = train_fold(bags[:6], y[:6], bags[6:], y[6:], 4, 2, cfg)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_plots_leave_the_callers_matplotlib_backend_and_figures(tmp_path):
    """draw_heatmap / plot_leaderboard / plot_report called matplotlib.use("Agg"): a notebook's inline backend was
    switched off for the rest of its session (its plots no longer shown)."""
    import matplotlib

    from gigaslide.evaluation.tiles import plot_report
    from gigaslide.mil.benchmark import plot_leaderboard
    from gigaslide.mil.heatmap import draw_heatmap

    old = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's backend
    try:
        import matplotlib.pyplot as plt

        plt.close("all")
        fig = plt.figure()
        draw_heatmap(np.full((20, 30, 3), 200, np.uint8), 1.0, np.array([[0, 0], [10, 0]]), np.array([0.2, 0.9]),
                     10, tmp_path / "h.png", title="t")
        ci = {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}
        plot_leaderboard([{"encoder": "a", "tile": {"linear": {"auc": ci}}, "slide": {"auc": ci}}], tmp_path / "l.png")
        plot_report({"protocols": {"linear": {m: ci for m in ("auc", "balanced_accuracy", "macro_f1")}},
                     "train": {"encoder": "a"}}, tmp_path / "r.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [fig.number]  # the caller's figure, none of ours left open
        plt.close(fig)
    finally:
        matplotlib.use(old)
    from PIL import Image

    for name in ("h.png", "l.png", "r.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 5  # drawn, not blank


@pytest.fixture
def saved(tmp_path):
    cfg = TrainConfig(model="abmil", hidden=8)
    torch.manual_seed(0)
    d = save_model(tmp_path / "fold0", _build(cfg, 4, 2), cfg, in_dim=4, n_classes=2,
                   extra={"encoder": "toy", "tile_size": 224, "mpp": 0.5})
    return d


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(in_dim=10**12), r"does not hold the model config.json describes \(mean: \[1, 4\] stored"),
    (lambda m: m["train_config"].update(hidden=10**5), r"does not hold the model config.json describes"),
    (lambda m: m.pop("n_classes"), r"not a MIL model's config.json \(KeyError"),
    (lambda m: m.update(train_config=[1]), r"not a MIL model's config.json"),
    (lambda m: m.update(format_version=99), r"config.json: written in format version 99"),
    (lambda m: m.update(mpp="abc"), r"not a MIL model's config.json \(ValueError"),
    (lambda m: m.update(tile_size=float("nan")), r"not a MIL model's config.json \(ValueError: tile_size nan"),
])
def test_a_config_json_that_does_not_match_its_weights_is_one_line(saved, edit, match):
    """load_model built the model config.json describes before looking at the weights: in_dim 10^12 asked the
    allocator for terabytes (a bare RuntimeError; a smaller lie filled the memory), and any other mismatch was
    load_state_dict's multi-line RuntimeError. The shapes are now compared on the meta device first. A config.json
    written by a newer gigaslide was loaded as if this one wrote it; an mpp of the wrong type passed the load and
    failed in check_features_fit with a bare ValueError."""
    m = json.loads((saved / "config.json").read_text())
    edit(m)
    (saved / "config.json").write_text(json.dumps(m))
    with pytest.raises(GigaslideError, match=match):
        load_model(saved)


def test_damaged_weights_are_one_line(saved):
    (saved / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(GigaslideError, match="model.safetensors cannot be read"):
        load_model(saved)


def test_the_saved_model_loads_back_the_same(saved):
    model, meta = load_model(saved)
    cfg = TrainConfig(model="abmil", hidden=8)
    torch.manual_seed(0)
    ref = _build(cfg, 4, 2).eval()
    x = torch.randn(5, 4)
    assert torch.equal(model(x)["logits"], ref(x)["logits"]) and meta["tile_size"] == 224


def test_features_of_another_tile_size_are_refused(saved, tmp_path):
    """The model was trained on 224 px tiles: features of 256 px tiles at the same mpp (another field of view, a
    cohort train-mil refuses to mix) were scored and drawn without a word."""
    _, meta = load_model(saved)
    x = np.zeros((3, 4), np.float32)
    store.save(tmp_path / "a.h5", x, attrs={"encoder": "toy", "mpp": 0.5, "tile_size": 256})
    with pytest.raises(GigaslideError, match="features are of 256 px tiles, the model was trained on 224 px tiles"):
        check_features_fit(meta, store.load(tmp_path / "a.h5"), tmp_path / "a.h5")
    store.save(tmp_path / "b.h5", x, attrs={"encoder": "toy", "mpp": 0.5}, coords_attrs={"patch_size": 256})
    with pytest.raises(GigaslideError, match="256 px tiles"):  # TRIDENT's name for it
        check_features_fit(meta, store.load(tmp_path / "b.h5"), tmp_path / "b.h5")
    store.save(tmp_path / "c.h5", x, attrs={"encoder": "toy", "mpp": 0.5, "tile_size": 224})
    check_features_fit(meta, store.load(tmp_path / "c.h5"), tmp_path / "c.h5")  # the model's own
    store.save(tmp_path / "d.h5", x)  # another tool's file without the attrs: accepted (its dim fits)
    check_features_fit(meta, store.load(tmp_path / "d.h5"), tmp_path / "d.h5")
    shutil.rmtree(tmp_path / "fold0")


def test_the_predictions_record_names_the_fold_seed_and_model_settings_in_effect(tmp_path):
    """run_cv(fold_seed=3) drew its folds with seed 3, but the predictions' record said only seed 0 (the model's):
    re-made from the record, the folds differed; the model's settings (--model-args) were not recorded either."""
    from gigaslide.mil.cv import run_cv

    rng = np.random.default_rng(0)
    (tmp_path / "f").mkdir()
    rows = ["slide_id,label"]
    for i in range(8):
        store.save(tmp_path / "f" / f"s{i}.h5", rng.normal(size=(5, 4)).astype(np.float32) + i % 2,
                   attrs={"encoder": "toy", "slide_id": f"s{i}"})
        rows.append(f"s{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = TrainConfig(model="clam_sb", epochs=1, hidden=8, patience=1, min_epochs=1, model_kwargs={"k_sample": 2})
    run_cv(tmp_path / "f", tmp_path / "labels.csv", tmp_path / "run", cfg=cfg, folds=2, n_bootstrap=0,
           verbose=False, fold_seed=3)
    run = tmp_path / "run"
    for side in (run / "predictions.provenance.json", run / "fold0" / "predictions.provenance.json"):
        rec = json.loads(side.read_text())
        assert rec["seed"] == 0 and rec["fold_seed"] == 3 and rec["model_args"] == {"k_sample": 2}


def test_load_model_leaves_the_callers_torch_stream(tmp_path):
    """Building the model before its weights are loaded drew its random initialisation from the caller's stream."""
    cfg = TrainConfig(model="abmil", epochs=1)
    save_model(tmp_path / "fold0", _build(cfg, 8, 2), cfg, in_dim=8, n_classes=2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_model(tmp_path / "fold0")
    assert torch.equal(torch.rand(3), expected)
